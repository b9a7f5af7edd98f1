"""Health of attached volumes: path status, heal, the registry's view (``nvmeof-mp paths``,
``heal``, ``status`` and the heal timer), mixed into :class:`.connector.NVMeOFConnector`."""

from __future__ import annotations

from oslo_log import log as logging

from nvmeof_mp import connection
from nvmeof_mp.exception import NVMeOFError

LOG = logging.getLogger(__name__)


class Health:
    """The connector's health methods; they use its sysfs reader, registry, clock and
    connect and lock methods."""

    def get_path_status(self, connection_properties):
        """Per-target report: device, every path (state, ANA state, timeouts) and a verdict."""
        from nvmeof_mp import status
        request = connection.parse(connection_properties)
        snap = self.sysfs.snapshot([t.nqn for t in request.targets])
        return [status.target_status(snap, t) for t in request.targets]

    def check_paths(self, connection_properties):
        """Heal an attached volume: reconnect missing or deleted portals and replicas, re-add
        md legs, reinstate dm paths.  Idempotent and safe to run from a timer.  A volume the
        registry knows as attached is healed even when no path is left (the kernel deleted
        its controllers after ``ctrl_loss_tmo``); an attached volume it does not know is
        adopted; a volume this host has not attached is left alone.
        Returns {'attached', 'healed', 'before', 'after'}.
        """
        return self._check_paths(connection_properties)

    def _check_paths(self, connection_properties, lock_path=None):
        request = connection.parse(connection_properties)
        with self._volume_lock(request, lock_path):
            self._recover_around(request)
            return self._heal(request, connection_properties)

    def _heal(self, request, info):
        from nvmeof_mp import recovery
        from nvmeof_mp import registry as reg
        key = request.volume_key
        before = self.get_path_status(info)
        record = self.registry.get(key)
        if self.registry.interrupted(record):
            done = recovery.recover_locked(self, key)
            return {"attached": False, "healed": False, "recovered": done, "before": before,
                    "after": self.get_path_status(info)}
        registered = record is not None and record["state"] == reg.ATTACHED
        if not registered and not self.get_volume_paths(info):
            return {"attached": False, "healed": False, "before": before, "after": before}
        if registered:
            joined = self._connect(request)
        else:
            joined = self._connect_registered(request, info)    # attached before the registry
        readded = joined.get("readded") or []
        # a replica md or dm keeps out (split history, smaller than the map) is not healed,
        # whatever its NVMe paths say
        left_out = [{"nqn": r["nqn"], "error": r["error"]} for r in joined.get("replicas") or ()
                    if r["device"] and r["degraded"] and r["error"]]
        # new controllers are live; give their namespace paths a moment to show up
        from nvmeof_mp.waiting import poll
        after = poll(lambda: _all_healthy(self.get_path_status(info)),
                     2.0, self.clock) or self.get_path_status(info)
        was = ",".join(b["verdict"] for b in before)
        now = ",".join(a["verdict"] for a in after)
        LOG.info("check_paths %s: %s -> %s", request.describe(), was, now)
        healed = was != now or bool(readded)
        if healed and registered:
            self.registry.event(key, "heal: %s -> %s%s" % (was, now, "; md legs re-added: %s"
                                                            % ", ".join(readded)
                                                            if readded else ""))
        return {"attached": True, "healed": healed, "before": before, "after": after,
                "readded": readded, "degraded": bool(left_out), "left_out": left_out}

    def heal_all(self):
        """Heal every volume of the registry (``nvmeof-mp heal --all``, the heal timer), and
        finish or roll back what crashed processes left.  A volume with DH-HMAC-CHAP secrets
        is healed only by root (its secrets are readable by root only).  Returns one entry
        per record: {'key', 'volume', 'action', 'verdicts', 'degraded', 'left_out'}
        (``left_out``: the replicas md or dm keeps out although their paths are back, as
        ``check_paths`` reports them)."""
        from nvmeof_mp import recovery
        from nvmeof_mp import registry as reg
        self.registry.ensure_boot()
        out = []
        for record in self.registry.records():
            key = record["key"]
            entry = {"key": key, "volume": record.get("describe"), "verdicts": [],
                     "degraded": False, "left_out": []}
            out.append(entry)
            if self.registry.interrupted(record):
                entry["action"] = recovery.recover(self, record)
                continue
            if record["state"] != reg.ATTACHED:
                entry["action"] = "skipped: %s in progress" % record["state"]
                continue
            info = record["connection_info"]
            if record.get("secrets"):
                info = self.registry.secret_info(key)
                if info is None:
                    entry["action"] = ("skipped: its DH-HMAC-CHAP secrets are readable by "
                                       "root only")
                    continue
            try:
                result = self._check_paths(info, self.lock_path_of(record))
            except NVMeOFError as e:
                entry["action"] = "failed: %s" % e
                continue
            entry["verdicts"] = [r["verdict"] for r in result["after"]]
            entry["action"] = "healed" if result["healed"] else "checked"
            entry["degraded"] = bool(result.get("degraded"))
            entry["left_out"] = list(result.get("left_out") or ())
        return out

    def attachments(self):
        """Every volume of the registry with its per-path state (``nvmeof-mp status``)."""
        self.registry.ensure_boot()
        out = []
        for record in self.registry.records():
            entry = {k: record.get(k) for k in ("key", "describe", "mode", "state", "device",
                                                  "created", "owner", "events", "since")}
            entry["interrupted"] = self.registry.interrupted(record)
            try:
                entry["targets"] = self.get_path_status(record["connection_info"])
            except NVMeOFError as e:
                entry["targets"], entry["error"] = [], str(e)
            if not entry["device"] and record.get("mode") in ("single", "multipath"):
                entry["device"] = (entry["targets"] or [{}])[0].get("device")   # found now
            out.append(entry)
        return out


def _all_healthy(reports):
    return reports if all(r["verdict"] == "healthy" for r in reports) else None

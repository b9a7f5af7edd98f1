"""What this host attached: the attachment registry as every process reads it.

One record per attached volume (connection information without its secrets, mode, device,
state, what the attach made, the last events), and one reference per (volume, subsystem) it
uses: a subsystem's controllers stay while any volume of this host holds a reference, and go
with the last one (see ``plan.plan_release``).  Every process that uses the library on the
host (nova-compute, cinder-volume, the CLI, the heal timer) shares it; the files are written
by the privsep daemon only (``privileged.registry``: root-owned, atomic), read directly here.

States: ``attaching`` (written before the first controller is made), ``attached``,
``detaching`` (written before the flush).  A record left ``attaching`` or ``detaching`` by a
process that died is *interrupted*: the next call on the volume or on a subsystem it holds,
and ``nvmeof-mp heal --all``, finish or roll it back (``recovery``).  Records never outlive
the boot: the first use after a boot removes them (``ensure_boot``).
"""

from __future__ import annotations

import json
import os
import time

from oslo_log import log as logging

from nvmeof_mp import connection
from nvmeof_mp.privileged import registry as store

LOG = logging.getLogger(__name__)

ATTACHING, ATTACHED, DETACHING = store.STATES
EVENTS_KEPT = 20


def _start_time(pid):
    """A process's start time (clock ticks since boot), which tells a pid reused by another
    process from the one that wrote a record."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_owner = {}


def owner():
    """This process (pid and start time; read once per process)."""
    pid = os.getpid()
    if _owner.get("pid") != pid:
        _owner.update(pid=pid, start=_start_time(pid))
    return dict(_owner)


def alive(who):
    """Is the process that wrote ``who`` (an ``owner()``) still running?"""
    try:
        pid = int(who["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return True
    start = _start_time(pid)
    return start is not None and start == who.get("start")


def without_secrets(info):
    """Connection information as JSON, DH-HMAC-CHAP secrets removed (not masked: a record must
    parse as connection information again)."""
    if isinstance(info, dict):
        return {k: without_secrets(v) for k, v in info.items()
                if k not in connection.SECRET_KEYS}
    if isinstance(info, (list, tuple)):
        return [without_secrets(v) for v in info]
    return info


def _json(info):
    return json.loads(json.dumps(info, default=str))


def add_event(record, text):
    """Append (time, text) to a record's events, keeping the last ``EVENTS_KEPT``."""
    events = list(record.get("events") or []) + [[round(time.time(), 3), text]]
    record["events"] = events[-EVENTS_KEPT:]


class Registry:
    """Reads the registry of the host under ``root``; writes go through ``kernel``."""

    def __init__(self, kernel, root="/"):
        self.kernel = kernel
        self.root = root
        self.base = store.state_dir(root)
        self._boot_checked = False

    # -- reading -------------------------------------------------------------------------------

    def _read(self, *parts):
        try:
            with open(os.path.join(self.base, *parts)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def get(self, key):
        return self._read("volumes", store.key_name(key) + ".json")

    def records(self):
        try:
            names = sorted(os.listdir(os.path.join(self.base, "volumes")))
        except OSError:
            return []
        found = (self._read("volumes", n) for n in names if n.endswith(".json"))
        return sorted((r for r in found if r), key=lambda r: r.get("since", 0))

    def ref(self, key, nqn, host_nqn):
        return self._read("refs", store.subsystem_name(nqn, host_nqn),
                          store.key_name(key) + ".json")

    def users(self, nqn, host_nqn, but=None):
        """References of volumes other than ``but`` to (nqn, host_nqn)."""
        return store.users(self.base, nqn, host_nqn, but)

    def secret_info(self, key):
        """The connection information with its secrets: readable by root only."""
        return self._read("secrets", store.key_name(key) + ".json")

    def interrupted(self, record):
        return bool(record) and record.get("state") in (ATTACHING, DETACHING) and not alive(
            record.get("owner") or {})

    def ensure_boot(self):
        """Once per process: records of an earlier boot are removed before anything reads
        them (the daemon compares the boot ID itself)."""
        if self._boot_checked:
            return
        try:
            with open(os.path.join(self.base, "boot_id")) as f:
                seen = f.read().strip()
        except OSError:
            seen = None
        if seen is not None and seen != store.current_boot_id(self.root):
            if self.kernel.registry_reconcile():
                LOG.info("Attachment registry: records of an earlier boot removed")
        self._boot_checked = True

    # -- writing -------------------------------------------------------------------------------

    def record(self, request, info, state, previous=None, event=None, **extra):
        """A new record for ``request`` (and the secret part apart, or None)."""
        previous = previous or {}
        rec = {"key": request.volume_key, "mode": request.mode.value, "state": state,
               "describe": request.describe(), "owner": owner(),
               "since": previous.get("since") or round(time.time(), 3),
               "connection_info": _json(without_secrets(info)),
               "device": previous.get("device"), "created": previous.get("created") or {},
               "events": list(previous.get("events") or [])}
        if event:
            add_event(rec, event)
        rec.update(extra)
        secrets = _json(info) if any(t.dhchap_secret or t.dhchap_ctrl_secret
                                     for t in request.targets) else None
        rec["secrets"] = secrets is not None
        return rec, secrets

    def put(self, rec, secrets=None):
        self.kernel.registry_put(rec["key"], rec, secrets)

    def event(self, key, text, **changes):
        """Append an event (and changes) to the record of ``key``, if there is one."""
        rec = self.get(key)
        if rec is None:
            return None
        rec.update(changes)
        add_event(rec, text)
        self.kernel.registry_put(key, rec, None)      # secrets, if any, stay as they are
        return rec

    def claim(self, key, nqn, host_nqn, controllers_exist, pending=None):
        """The arguments of ``Kernel.registry_hold`` that hold (nqn, host_nqn) for volume
        ``key``, or None when it holds it already (and no record is pending).  Called under
        the subsystem lock, before any controller is made; the hold goes with the first
        connect call (one privileged call), or alone when nothing is to be connected.
        The reference is *adopted* when the subsystem's controllers predate every reference
        (made by an older release, os-brick or by hand): they are then only deleted when the
        subsystem shows no other namespace.  ``pending``: (record, secrets) written with it."""
        own = self.ref(key, nqn, host_nqn)
        if own is not None and pending is None:
            return None
        others = self.users(nqn, host_nqn, but=key)
        if own is not None:
            adopted = bool(own.get("adopted"))
        elif others:
            adopted = any(r.get("adopted") for r in others)
        else:
            adopted = bool(controllers_exist)
        rec, secrets = pending if pending is not None else (None, None)
        return {"key": key, "nqn": nqn, "host_nqn": host_nqn, "adopted": adopted,
                "owner": owner(), "record": rec, "secret_info": secrets}

    def drop(self, key):
        self.kernel.registry_drop(key)

"""Attach and detach ONE target (a volume, or one replica): where portals are connected.

Flow: snapshot (sysfs, narrowed to the target's NQN) -> plan (pure) -> privileged calls ->
wait for the kernel (adaptive polling under a deadline) -> result.  All of it under the lock of
(subsystem NQN, host NQN), so volumes of other subsystems proceed in parallel.

A failed attach, whatever raised (a refused portal, a privsep daemon that died with the reply
of a connect, a bug), leaves no controller it created: the ones it knows by name, plus, for
connects whose reply was lost, the controllers of the target's portals that the snapshot taken
before connecting did not show (the lock keeps other users of this library out meanwhile).
"""

from __future__ import annotations

import dataclasses
import errno as errnolib
import uuid

from oslo_log import log as logging

from nvmeof_mp import claims, plan as planner
from nvmeof_mp.connection import Portal, Target
from nvmeof_mp.exception import (AlreadyConnected, DetachAborted, ForeignClaim, NVMeOFError,
                                 PortalConnectError, TargetUnreachable, VolumeDeviceNotFound)
from nvmeof_mp.hostinfo import has_fast_io_fail, host_authenticates
from nvmeof_mp.locks import subsystem_lock
from nvmeof_mp.topology import Namespace, Snapshot, can_open_rw, udev_settled
from nvmeof_mp.waiting import poll

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Unnamed:
    """A connect reply that does not say which controller exists now: success without a
    name (nvme-cli output that could not be parsed), or a failure without an errno (the
    kernel took the options but its reply could not be read): look in sysfs."""

    reason: str


@dataclasses.dataclass(frozen=True)
class TargetAttachment:
    target: Target
    namespace: Namespace
    created: tuple[str, ...]
    failures: tuple[PortalConnectError, ...]
    paths: tuple[planner.PathReport, ...]
    all_portals: bool = True        # False: one path was asked for (single path)
    #: portals with a live controller of this host NQN: a path whose namespace the kernel
    #: has not scanned yet is on its way (the attach does not wait for it), not missing
    live_portals: frozenset = frozenset()

    @property
    def device(self):
        return self.namespace.device

    @property
    def degraded(self):
        """Fewer paths than asked for: every portal (native multipath), or one live path
        (single path: the other portals are spares, not missing paths)."""
        if not self.all_portals:
            return not any(p.state == "live" for p in self.paths)
        wanted = {str(p) for p in self.target.portals}
        return bool(self.failures) or not wanted <= self.live_portals

    def summary(self):
        return ", ".join("%s %s%s" % (p.portal, p.state, "/" + p.ana_state if p.ana_state else "")
                         for p in self.paths) or "no paths"

    def as_dict(self):
        return {"device": self.device, "nqn": self.target.nqn, "degraded": self.degraded,
                "paths": [p.as_dict() for p in self.paths],
                "failed_portals": [str(f.portal) for f in self.failures]}


# A per-volume host NQN needs a host ID of its own: the kernel keeps one host ID per host NQN
# and refuses a second NQN with an ID it knows ("found same hostid ... but different hostnqn").
UUID_NQN_PREFIX = "nqn.2014-08.org.nvmexpress:uuid:"
# Name-based host IDs (uuid5) are made in this namespace.  Never change it: the kernel refuses a
# host NQN whose ID differs from the one its live controllers were made with.
HOST_ID_NAMESPACE = uuid.UUID("5d0c8f3e-2a7b-4e61-9c55-0b8e4f1a7d23")


def volume_host_id(host_nqn: str, own_host_id: str | None) -> str:
    """The host ID written with a per-volume host NQN: the UUID of a
    ``nqn.2014-08.org.nvmexpress:uuid:<uuid>`` NQN (what nvme-cli derives too), else a UUID
    made from the NQN's name; never the host's own ID."""
    own = str(own_host_id or "").strip().lower()
    if host_nqn.lower().startswith(UUID_NQN_PREFIX):
        try:
            found = uuid.UUID(host_nqn[len(UUID_NQN_PREFIX):])
        except ValueError:
            found = None
        if found is not None and found.int and str(found) != own:
            return str(found)
    return str(uuid.uuid5(HOST_ID_NAMESPACE, host_nqn))


@dataclasses.dataclass
class _Progress:
    """What an attach made so far, for the cleanup when it fails."""

    created: list = dataclasses.field(default_factory=list)       # controller names
    in_doubt: list = dataclasses.field(default_factory=list)      # portals, reply lost


def _auth_hint(target: Target, reason, errno):
    """What a DH-HMAC-CHAP refusal means, for the operator (never the key itself).  nvme-cli
    gives its exit status, not the errno: its text tells then."""
    if errno == errnolib.ENOKEY or "Required key not available" in reason:
        if not target.dhchap_secret:
            return (" (DH-HMAC-CHAP: the target requires authentication and the connection "
                    "info has no dhchap_secret)")
        return " (DH-HMAC-CHAP: a key the target requires is missing)"
    if errno == errnolib.EKEYREJECTED or "Key was rejected" in reason:
        if target.dhchap_ctrl_secret:
            return (" (DH-HMAC-CHAP: the target rejected dhchap_secret for this host NQN, or "
                    "the controller failed authentication against dhchap_ctrl_secret)")
        return " (DH-HMAC-CHAP: the target rejected dhchap_secret for this host NQN)"
    if errno == errnolib.EIO and (target.dhchap_secret or target.dhchap_ctrl_secret):
        # seen on 6.12: the target closes the connection after its failure message and the
        # host, unable to send its own, reports the queue's connect as an I/O error
        return (" (DH-HMAC-CHAP keys were given: Linux also reports a rejected dhchap_secret "
                "or dhchap_ctrl_secret this way; the kernel log tells)")
    return ""


class Attacher:
    """Executes connect/disconnect plans for single targets."""

    def __init__(self, kernel, sysfs, clock, policy, host_identity, lock_path=None, root="/",
                 can_open=None, registry=None):
        self.root = root
        self.fast_io_fail = has_fast_io_fail(root)      # Linux >= 5.11
        self.registry = registry        # registry.Registry, or None: no reference counting
        self.can_open = can_open or can_open_rw     # permission check of the calling process
        self.kernel = kernel
        self.sysfs = sysfs
        self.clock = clock
        self.policy = policy
        self.host_identity = host_identity      # callable -> (hostnqn, hostid)
        self.lock_path = lock_path

    # -- attach ------------------------------------------------------------------------------

    def attach(self, target: Target, all_portals: bool, replica_leg=False, key=None,
               pending=None, on_connected=None) -> TargetAttachment:
        """Attach ``target``.  With ``key`` (the volume's registry key) the subsystem is held
        for that volume before anything is connected; ``pending`` is the volume's record (and
        secrets) to write in the same call, see ``Registry.claim``.  ``on_connected(created)``
        is called once the controllers are made, before the wait for the device."""
        if (target.dhchap_secret or target.dhchap_ctrl_secret) and not host_authenticates(
                self.root):
            raise NVMeOFError("%s: this kernel has no NVMe host authentication "
                              "(NVME_HOST_AUTH): it would ignore the DH-HMAC-CHAP keys and "
                              "connect unauthenticated; refused" % target.describe())
        host_nqn, host_id = self.identity(target)
        with subsystem_lock(target.nqn, host_nqn, self.lock_path):
            snap = self.sysfs.snapshot([target.nqn])
            hold = None
            if self.registry is not None and key is not None:
                hold = self._claim(target, snap, host_nqn, key, pending)
            plan = planner.plan_connect(target, snap, host_nqn, all_portals)
            if hold is not None and not plan.connect:
                self.kernel.registry_hold(**hold)
                hold = None
            LOG.debug("Plan for %s: reuse %s, connect %s, rescan %s", target.describe(),
                      [(str(p), c) for p, c in plan.reuse], [str(p) for p in plan.connect],
                      plan.rescan)
            progress = _Progress()
            try:
                attachment = self._attach(snap, plan, host_nqn, host_id, replica_leg, progress,
                                          hold, on_connected)
                self._refuse_claimed(attachment)
            except BaseException:
                self._undo(snap, plan, host_nqn, progress)
                raise
        if attachment.degraded:
            LOG.warning("%s attached DEGRADED at %s: %s", target.describe(), attachment.device,
                        attachment.summary())
        return attachment

    def _refuse_claimed(self, attachment):
        """A namespace a foreign dm map (multipathd's) holds is not ours to hand out or join:
        ``ForeignClaim`` (the attach is then undone)."""
        ns = attachment.namespace
        # a per-controller namespace (native multipath off) is what multipathd may take
        why = claims.check(self.root, ns.name, self.clock,
                           self.policy.device_timeout if ns.controller else 0.0)
        if why:
            LOG.error("%s: %s is not used: %s", attachment.target.describe(),
                      attachment.device, why)
            raise ForeignClaim(device=attachment.device, reason=why)

    def _claim(self, target, snap, host_nqn, key, pending):
        ctrls = [c for c in snap.controllers(target.nqn)
                 if c.state != "deleting" and (c.hostnqn is None or c.hostnqn == host_nqn)]
        if (pending is not None and pending[0]["state"] == "attaching"
                and planner.find_namespace(target, snap) is not None
                and self.registry.ref(key, target.nqn, host_nqn) is None):
            # attached before the registry knew it (an older release, os-brick): adopted
            pending[0]["state"] = "attached"
            pending[0]["adopted"] = True
        return self.registry.claim(key, target.nqn, host_nqn, bool(ctrls), pending)

    def _attach(self, before, plan, host_nqn, host_id, replica_leg, progress, hold=None,
                on_connected=None):
        target = plan.target
        if plan.rescan:
            self.kernel.rescan_controllers(plan.rescan)
        self._apply_policy(before, plan, replica_leg)
        failures = self._connect(plan, host_nqn, host_id, replica_leg, before, progress, hold)
        if not plan.reuse and not progress.created and not any(
                isinstance(f, AlreadyConnected) for f in failures):
            raise TargetUnreachable(target.nqn, failures)
        if on_connected is not None:
            on_connected(tuple(progress.created))
        snap, ns = self._wait_device(target, plan.all_portals and len(target.portals) > 1,
                                     replica_leg)
        return TargetAttachment(
            target, ns, tuple(progress.created), tuple(f for f in failures
                                                       if not isinstance(f, AlreadyConnected)),
            planner.path_report(ns, snap, target.nqn), plan.all_portals,
            frozenset(str(p) for p in target.portals
                      if any(c.live and planner.controller_matches(c, target.nqn, p, host_nqn)
                             for c in snap.controllers(target.nqn))))

    def _undo(self, before, plan, host_nqn, progress):
        """Delete what a failed attach created; never raises (the attach's error matters)."""
        target = plan.target
        names = list(progress.created)
        if progress.in_doubt:
            try:
                names += [c.name for c in self._new_controllers(target, before, host_nqn,
                                                                progress.in_doubt)
                          if c.name not in names]
            except Exception:
                LOG.exception("Could not look for the controllers of %s a failed attach may "
                              "have made", target.describe())
        for name in names:
            try:
                self.remove_controllers([name], "attach of %s failed" % target.describe())
            except Exception:
                LOG.exception("Could not delete controller %s after the failed attach of %s",
                              name, target.describe())

    def _new_controllers(self, target, before, host_nqn, portals):
        """Controllers of ``target`` on ``portals`` (and ``host_nqn``) that ``before`` did not
        show: the ones made by connects whose reply was lost.  Reads sysfs once; only ever
        called when a reply was lost."""
        old = {(c.name, c.portal) for c in before.controllers(target.nqn)}
        now = self.sysfs.snapshot([target.nqn])
        return [c for c in now.controllers(target.nqn)
                if (c.name, c.portal) not in old and c.state != "deleting"
                and any(planner.controller_matches(c, target.nqn, p, host_nqn)
                        for p in portals)]

    def _apply_policy(self, snap, plan, replica_leg):
        """Bring reused controllers to the timeout policy (only where they differ)."""
        reused = {name for _, name in plan.reuse}
        ctrls = [c for c in snap.controllers(plan.target.nqn) if c.name in reused]
        wanted = self.policy.controller_options(replica_leg, self.fast_io_fail)
        for name, attrs in planner.attr_updates(ctrls, wanted).items():
            LOG.info("Applying timeout policy to %s: %s", name, attrs)
            errors = {a: e for a, e in self.kernel.set_controller_attrs(name, attrs).items() if e}
            if errors:
                LOG.warning("Could not set %s on %s: %s", ", ".join(errors), name, errors)

    def identity(self, target):
        """(host NQN, host ID) this host connects ``target`` with."""
        host_nqn, host_id = self.host_identity()
        if target.host_nqn and target.host_nqn != host_nqn:
            return target.host_nqn, volume_host_id(target.host_nqn, host_id)
        return host_nqn, host_id

    def _connect(self, plan, host_nqn, host_id, replica_leg, before, progress, hold=None):
        """Connect the planned portals: all together (one kernel call for all of them), or
        one after another until one works.  Controller names go to ``progress.created`` as
        soon as they are known; a call that raised leaves its portals in ``progress.in_doubt``
        and the exception goes up (the attach is undone).  ``hold``: the registry hold that
        goes with the first connect call."""
        if not plan.connect:
            return []
        options = self.policy.controller_options(replica_leg, self.fast_io_fail)
        target = plan.target
        if plan.all_portals:
            opts = [self._connect_opts(target, p, host_nqn, host_id, options)
                    for p in plan.connect]
            progress.in_doubt[:] = plan.connect
            try:
                replies = self.kernel.connect_all(opts, hold=hold)
            except NVMeOFError as e:
                replies = [e] * len(opts)
            progress.in_doubt.clear()
            results = [self._outcome(target, p, r) for p, r in zip(plan.connect, replies,
                                                                      strict=True)]
            results = self._name_unknown(target, before, host_nqn, plan.connect, results,
                                         progress)
        else:
            results = []
            for portal in plan.connect:
                opts = self._connect_opts(target, portal, host_nqn, host_id, options)
                progress.in_doubt[:] = [portal]
                try:
                    reply = self.kernel.connect(opts, hold=hold)
                except NVMeOFError as e:
                    reply = e
                hold = None
                progress.in_doubt.clear()
                results += self._name_unknown(target, before, host_nqn, [portal],
                                              [self._outcome(target, portal, reply)], progress)
                if isinstance(results[-1], (str, AlreadyConnected)):
                    break
        failures = [r for r in results if isinstance(r, PortalConnectError)]
        for f in failures:
            if not isinstance(f, AlreadyConnected):
                LOG.warning("Portal %s of %s: %s", f.portal, target.nqn, f.reason)
        return failures

    def _name_unknown(self, target, before, host_nqn, portals, results, progress):
        """Record created controllers; a reply that does not say which controller exists
        (``_Unnamed``) is looked up in sysfs: found, it is ours; else a failure."""
        unknown = [p for p, r in zip(portals, results, strict=True)
                   if isinstance(r, _Unnamed)]
        found = {}
        if unknown:
            progress.in_doubt[:] = unknown
            for ctrl in self._new_controllers(target, before, host_nqn, unknown):
                for portal in unknown:
                    if planner.controller_matches(ctrl, target.nqn, portal, host_nqn):
                        found.setdefault(portal, ctrl.name)
            progress.in_doubt.clear()
        out = []
        for portal, result in zip(portals, results, strict=True):
            if isinstance(result, _Unnamed):
                reason = result.reason
                result = found.get(portal) or PortalConnectError(portal, reason)
                if isinstance(result, str):
                    LOG.warning("Connect of %s named no controller (%s); found %s", portal,
                                reason, result)
            if isinstance(result, str):
                progress.created.append(result)
            out.append(result)
        return out

    @staticmethod
    def _connect_opts(target: Target, portal: Portal, host_nqn, host_id, options):
        opts = dict(options, nqn=target.nqn, traddr=portal.traddr, trsvcid=portal.trsvcid,
                    transport=portal.transport, host_nqn=host_nqn, host_id=host_id)
        if target.dhchap_secret:
            opts["dhchap_secret"] = target.dhchap_secret
        if target.dhchap_ctrl_secret:
            opts["dhchap_ctrl_secret"] = target.dhchap_ctrl_secret
        return opts

    @staticmethod
    def _outcome(target: Target, portal: Portal, reply):
        """A kernel reply -> controller name, AlreadyConnected, PortalConnectError, or
        ``_Unnamed`` when the reply does not tell whether or as what a controller exists."""
        if isinstance(reply, Exception):
            return PortalConnectError(portal, str(reply))
        if reply.get("controller"):
            LOG.debug("Connected %s of %s as %s", portal, target.nqn, reply["controller"])
            return reply["controller"]
        if reply.get("already"):
            return AlreadyConnected(portal, "already connected")
        if not reply.get("error") and "controller" in reply:
            return _Unnamed("connected, but the reply names no controller")
        if reply.get("error") and reply.get("errno") is None:
            return _Unnamed(reply["error"])
        reason = reply.get("error") or "unknown error"
        return PortalConnectError(portal, reason + _auth_hint(target, reason, reply.get("errno")),
                                  reply.get("errno"))

    def _wait_device(self, target: Target, multipath: bool,
                     replica_leg: bool) -> tuple[Snapshot, Namespace]:
        """Poll sysfs until the namespace is visible with a usable path (and udev is done,
        see ``policy.UDEV_MODES``).

        With several portals an optimized path is awaited for ``policy.ana_wait`` seconds;
        after that a non-optimized one is accepted.  Other new paths are not awaited: the
        volume is usable, and their controllers are already live.
        """
        start = self.clock.monotonic()
        seen = {}
        can_open = None if replica_leg else self.can_open

        def ready():
            if seen.get("ns") is None and not self.sysfs.has_namespaces(target.nqn):
                return None
            snap = self.sysfs.snapshot([target.nqn], detail=False)
            ns = planner.find_namespace(target, snap)
            seen["snap"], seen["ns"] = snap, ns
            if ns is None or not planner.usable_path(ns, snap, target.nqn):
                return None
            seen.setdefault("visible", self.clock.monotonic() - start)
            if not udev_settled(self.root, ns.name, self.policy.wait_for_udev, can_open):
                return None
            seen.setdefault("udev", self.clock.monotonic() - start)
            if (multipath and ns.paths
                    and self.clock.monotonic() - start < self.policy.ana_wait
                    and planner.best_ana_state(ns, snap, target.nqn) != "optimized"):
                return None
            return snap, ns

        found = poll(ready, self.policy.device_timeout, self.clock)
        if found:
            LOG.debug("%s ready after %.3fs (usable %.3fs, udev settled %.3fs)", found[1].device,
                      self.clock.monotonic() - start, seen.get("visible", -1),
                      seen.get("udev", -1))
            return found
        snap, ns = seen.get("snap"), seen.get("ns")
        if ns is None:
            raise VolumeDeviceNotFound(device=target.describe())
        if not planner.usable_path(ns, snap, target.nqn):
            paths = ", ".join("%s %s%s" % (p.portal, p.state,
                                           "/" + p.ana_state if p.ana_state else "")
                              for p in planner.path_report(ns, snap, target.nqn))
            raise VolumeDeviceNotFound(
                "%s is visible as %s but has no usable path after %ss (%s)" % (
                    target.describe(), ns.device, self.policy.device_timeout,
                    paths or "no paths"), device=ns.device)
        LOG.warning("udev has not processed %s after %ss: handing it out anyway", ns.device,
                    self.policy.device_timeout)
        return snap, ns

    # -- detach ------------------------------------------------------------------------------

    def detach(self, target: Target, flush=True, force=False, key=None, drop=False):
        """Flush the volume's device, then delete the subsystem's controllers when no other
        volume of this host needs them (``plan.plan_release``).

        Returns a list of error texts; a volume that is not connected is a no-op.  Bounded in
        time: a flush is attempted only when a path can serve it, and the daemon gives it up
        after ``policy.flush_timeout``.  Without a usable path, or after a failed flush, the
        detach raises ``DetachAborted`` (the queued data stays, a retry can still flush it)
        unless ``force``: then the controllers are deleted, which fails whatever I/O is queued.
        ``key``: the volume's registry key, whose reference to the subsystem is dropped (with
        ``drop`` its whole record) in the call that deletes the controllers.
        """
        host_nqn, _ = self.identity(target)
        errors = []
        with subsystem_lock(target.nqn, host_nqn, self.lock_path):
            snap = self.sysfs.snapshot([target.nqn])
            registered = self.registry is not None and key is not None
            own = self.registry.ref(key, target.nqn, host_nqn) if registered else None
            users = self.registry.users(target.nqn, host_nqn, but=key) if registered else ()
            adopted = own is None or bool(own.get("adopted"))
            decided = planner.plan_release(target, snap, host_nqn, users, adopted,
                                           self._in_use(target, snap))
            ns = decided.namespace
            if ns is None and not decided.controllers:
                LOG.debug("%s is not connected: nothing to do", target.describe())
                if own is not None:
                    self.kernel.registry_release(key, target.nqn, host_nqn, [], [], drop)
                return errors
            if ns is not None and flush:
                err = self._flush(target, ns, snap, force)
                if err:
                    if not force:       # the volume stays attached: its data is not written
                        raise DetachAborted(what=target.describe(), reason=err)
                    errors.append(err)
            if decided.keep:
                LOG.info("Keeping the controllers of %s: %s", target.nqn, decided.keep)
            if registered:
                result = self.kernel.registry_release(key, target.nqn, host_nqn,
                                                      decided.delete, decided.check, drop)
                errors += result["errors"]
                if result["kept"] and not decided.keep:
                    LOG.info("Keeping the controllers of %s: %s", target.nqn, result["kept"])
                for err in result["errors"]:
                    LOG.warning("Detach of %s: %s", target.describe(), err)
            elif decided.delete:
                errors += self.remove_controllers(decided.delete,
                                                  "detach of %s" % target.describe())
        return errors

    def _in_use(self, target, snap):
        """{device name: reason} for the subsystem's namespaces in use on this host (mounted,
        held, swap: what sysfs and mountinfo show; the daemon also tries an exclusive open)."""
        from nvmeof_mp import inuse
        return inuse.in_use(self.root, sorted({n.name for n in snap.namespaces(target.nqn)}))

    def _flush(self, target, ns, snap, force):
        """Flush the device, or say why not: with no usable path the flush could only queue
        (until ctrl_loss_tmo, forever with -1)."""
        if not planner.usable_path(ns, snap, target.nqn):
            return "no live path to %s: flush impossible%s" % (
                ns.device, " (detached without it)" if force else
                "; detach with force to discard what is queued")
        return self.kernel.flush_device(ns.device, self.policy.flush_timeout)

    def remove_controllers(self, names, why):
        """Delete controllers; returns error texts (logged, not raised)."""
        errors = []
        for name in names:
            err = self.kernel.delete_controller(name)
            if err:
                errors.append(err)
                LOG.warning("Deleting controller %s (%s) failed: %s", name, why, err)
            else:
                LOG.debug("Deleted controller %s (%s)", name, why)
        return errors

"""Attach and detach ONE target (a volume, or one replica): where portals are connected.

Flow: snapshot (sysfs, narrowed to the target's NQN) -> plan (pure) -> privileged calls ->
wait for the kernel (adaptive polling under a deadline) -> result.  All of it under the lock of
(subsystem NQN, host NQN), so volumes of other subsystems proceed in parallel.
"""

from __future__ import annotations

import dataclasses

from oslo_log import log as logging

from nvmeof_mp import plan as planner
from nvmeof_mp.connection import Portal, Target
from nvmeof_mp.exception import (AlreadyConnected, NVMeOFError, PortalConnectError,
                                 TargetUnreachable, VolumeDeviceNotFound)
from nvmeof_mp.locks import subsystem_lock
from nvmeof_mp.topology import Namespace, Snapshot, can_open_rw, udev_settled
from nvmeof_mp.waiting import poll

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TargetAttachment:
    target: Target
    namespace: Namespace
    created: tuple[str, ...]
    failures: tuple[PortalConnectError, ...]
    paths: tuple[planner.PathReport, ...]

    @property
    def device(self):
        return self.namespace.device

    @property
    def degraded(self):
        wanted = {str(p) for p in self.target.portals}
        live = {p.portal for p in self.paths if p.state == "live"}
        return bool(self.failures) or not wanted <= live

    def summary(self):
        return ", ".join("%s %s%s" % (p.portal, p.state, "/" + p.ana_state if p.ana_state else "")
                         for p in self.paths) or "no paths"

    def as_dict(self):
        return {"device": self.device, "nqn": self.target.nqn, "degraded": self.degraded,
                "paths": [p.as_dict() for p in self.paths],
                "failed_portals": [str(f.portal) for f in self.failures]}


class Attacher:
    """Executes connect/disconnect plans for single targets."""

    def __init__(self, kernel, sysfs, clock, policy, host_identity, lock_path=None, root="/",
                 can_open=None):
        self.root = root
        self.can_open = can_open or can_open_rw     # permission check of the calling process
        self.kernel = kernel
        self.sysfs = sysfs
        self.clock = clock
        self.policy = policy
        self.host_identity = host_identity      # callable -> (hostnqn, hostid)
        self.lock_path = lock_path

    # -- attach ------------------------------------------------------------------------------

    def attach(self, target: Target, all_portals: bool, replica_leg=False) -> TargetAttachment:
        host_nqn, host_id = self._identity(target)
        with subsystem_lock(target.nqn, host_nqn, self.lock_path):
            snap = self.sysfs.snapshot([target.nqn])
            plan = planner.plan_connect(target, snap, host_nqn, all_portals)
            LOG.debug("Plan for %s: reuse %s, connect %s, rescan %s", target.describe(),
                      [(str(p), c) for p, c in plan.reuse], [str(p) for p in plan.connect],
                      plan.rescan)
            if plan.rescan:
                self.kernel.rescan_controllers(plan.rescan)
            self._apply_policy(snap, plan, replica_leg)
            created, failures = self._connect(plan, host_nqn, host_id, replica_leg)
            if not plan.reuse and not created and not any(
                    isinstance(f, AlreadyConnected) for f in failures):
                raise TargetUnreachable(target.nqn, failures)
            try:
                snap, ns = self._wait_device(target, all_portals and len(target.portals) > 1,
                                             replica_leg)
            except NVMeOFError:
                self.remove_controllers(created, "attach of %s failed" % target.describe())
                raise
            attachment = TargetAttachment(
                target, ns, tuple(created), tuple(f for f in failures
                                                  if not isinstance(f, AlreadyConnected)),
                planner.path_report(ns, snap, target.nqn))
        if attachment.degraded:
            LOG.warning("%s attached DEGRADED at %s: %s", target.describe(), attachment.device,
                        attachment.summary())
        return attachment

    def _apply_policy(self, snap, plan, replica_leg):
        """Bring reused controllers to the timeout policy (only where they differ)."""
        reused = {name for _, name in plan.reuse}
        ctrls = [c for c in snap.controllers(plan.target.nqn) if c.name in reused]
        wanted = self.policy.controller_options(replica_leg)
        for name, attrs in planner.attr_updates(ctrls, wanted).items():
            LOG.info("Applying timeout policy to %s: %s", name, attrs)
            errors = {a: e for a, e in self.kernel.set_controller_attrs(name, attrs).items() if e}
            if errors:
                LOG.warning("Could not set %s on %s: %s", ", ".join(errors), name, errors)

    def _identity(self, target):
        host_nqn, host_id = self.host_identity()
        if target.host_nqn and target.host_nqn != host_nqn:
            return target.host_nqn, None     # a per-volume host NQN has no host ID of ours
        return host_nqn, host_id

    def _connect(self, plan, host_nqn, host_id, replica_leg):
        """Connect the planned portals: all together (one kernel call for all of them), or
        one after another until one works."""
        if not plan.connect:
            return [], []
        options = self.policy.controller_options(replica_leg)
        target = plan.target
        if plan.all_portals:
            opts = [self._connect_opts(target, p, host_nqn, host_id, options)
                    for p in plan.connect]
            try:
                replies = self.kernel.connect_all(opts)
            except NVMeOFError as e:
                replies = [e] * len(opts)
            results = [self._outcome(target, p, r) for p, r in zip(plan.connect, replies,
                                                                      strict=True)]
        else:
            results = []
            for portal in plan.connect:
                opts = self._connect_opts(target, portal, host_nqn, host_id, options)
                try:
                    reply = self.kernel.connect(opts)
                except NVMeOFError as e:
                    reply = e
                results.append(self._outcome(target, portal, reply))
                if isinstance(results[-1], (str, AlreadyConnected)):
                    break
        created = [r for r in results if isinstance(r, str)]
        failures = [r for r in results if isinstance(r, PortalConnectError)]
        for f in failures:
            if not isinstance(f, AlreadyConnected):
                LOG.warning("Portal %s of %s: %s", f.portal, target.nqn, f.reason)
        return created, failures

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
        """A kernel reply -> controller name, AlreadyConnected or PortalConnectError."""
        if isinstance(reply, Exception):
            return PortalConnectError(portal, str(reply))
        if reply.get("controller"):
            LOG.debug("Connected %s of %s as %s", portal, target.nqn, reply["controller"])
            return reply["controller"]
        if reply.get("already"):
            return AlreadyConnected(portal, "already connected")
        return PortalConnectError(portal, reply.get("error") or "unknown error",
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
        if seen.get("ns") is not None:
            return seen["snap"], seen["ns"]      # visible, but no usable path: degraded
        raise VolumeDeviceNotFound(device=target.describe())

    # -- detach ------------------------------------------------------------------------------

    def detach(self, target: Target, flush=True, force=False):
        """Flush the volume's device, then delete controllers nothing else needs.

        Returns a list of error texts; a volume that is not connected is a no-op.  Bounded in
        time: a flush is attempted only when a path can serve it, and the daemon gives it up
        after ``policy.flush_timeout``.  Without a usable path, or after a failed flush, the
        detach stops (the queued data stays, a retry can still flush it) unless ``force``:
        then the controllers are deleted, which fails whatever I/O is queued.
        """
        host_nqn, _ = self._identity(target)
        errors = []
        with subsystem_lock(target.nqn, host_nqn, self.lock_path):
            snap = self.sysfs.snapshot([target.nqn])
            ns, ctrls = planner.plan_disconnect(target, snap, host_nqn)
            if ns is None and not ctrls:
                LOG.debug("%s is not connected: nothing to do", target.describe())
                return errors
            if ns is not None and flush:
                err = self._flush(target, ns, snap, force)
                if err:
                    errors.append(err)
                    if not force:
                        return errors
            if ctrls:
                errors += self.remove_controllers(ctrls, "detach of %s" % target.describe())
            elif ns is not None:
                LOG.info("Keeping controllers of %s: other namespaces use them", target.nqn)
        return errors

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

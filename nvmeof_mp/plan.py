"""Pure decisions: request + topology snapshot in, plan out.  No I/O here.

Everything that decides *what* to do (which portals to connect, which controllers to reuse,
rescan or delete, which block device is the volume) lives here so it can be tested with plain
values.  The connector executes the plans.
"""

from __future__ import annotations

import dataclasses

from nvmeof_mp.connection import Portal, Target
from nvmeof_mp.topology import (LIVE, TRANSIENT_STATES, Controller, Namespace, Snapshot,
                                Subsystem)

USABLE_STATES = (LIVE,) + TRANSIENT_STATES
ANA_PREFERENCE = ("optimized", "non-optimized")


@dataclasses.dataclass(frozen=True)
class ConnectPlan:
    """What to do for one target.

    ``reuse`` maps portals to controllers the kernel already has (matched on NQN, traddr,
    trsvcid, transport and host NQN).  ``connect`` lists portals to connect, in order.
    ``all_portals`` says whether every portal is wanted (native multipath) or only the first
    one that works.  ``rescan`` lists live reused controllers to rescan when the namespace is
    not visible yet.
    """

    target: Target
    reuse: tuple[tuple[Portal, str], ...]
    connect: tuple[Portal, ...]
    all_portals: bool
    rescan: tuple[str, ...]



def controller_matches(ctrl: Controller, nqn: str, portal: Portal, host_nqn: str | None):
    """The kernel's own duplicate rule: same subsystem, address, service and host NQN."""
    return (ctrl.nqn == nqn and ctrl.traddr == portal.traddr and ctrl.trsvcid == portal.trsvcid
            and ctrl.transport == portal.transport
            and (host_nqn is None or ctrl.hostnqn is None or ctrl.hostnqn == host_nqn))


def existing_controllers(target: Target, snapshot: Snapshot, host_nqn):
    """Portal -> usable controller (live, or on its way to live) already present."""
    found = {}
    for ctrl in snapshot.controllers(target.nqn):
        if ctrl.state not in USABLE_STATES:
            continue
        for portal in target.portals:
            if portal not in found and controller_matches(ctrl, target.nqn, portal, host_nqn):
                found[portal] = ctrl
    return found


def plan_connect(target: Target, snapshot: Snapshot, host_nqn, all_portals: bool) -> ConnectPlan:
    """Decide which portals need a new controller.

    With ``all_portals`` (native multipath) every portal without a controller is connected.
    Otherwise (single path) nothing is connected when a portal has a live controller; else the
    portals without a controller are tried in the given order until one works (as os-brick
    does), so a controller stuck reconnecting to a portal that is down does not hold the
    attach.  Only when every portal has a controller on its way to live is nothing connected:
    the attach then waits for one of them.
    """
    found = existing_controllers(target, snapshot, host_nqn)
    reuse = tuple((p, found[p].name) for p in target.portals if p in found)
    if all_portals or not any(c.live for c in found.values()):
        connect = tuple(p for p in target.portals if p not in found)
    else:
        connect = ()
    device = find_namespace(target, snapshot)
    rescan = () if device else tuple(found[p].name for p in target.portals
                                     if p in found and found[p].live)
    return ConnectPlan(target, reuse, connect, all_portals, rescan)


def find_namespace(target: Target, snapshot: Snapshot) -> Namespace | None:
    """The visible block device of ``target``: by uuid, else nguid, else nsid.

    Only namespaces of the target's own subsystem are considered, so two volumes that share a
    subsystem can never be confused, and nothing is guessed from which /dev entries appeared.
    With native multipath off one namespace can show up once per controller: the one behind a
    live controller is preferred.
    """
    kind, value = target.identity
    candidates = [ns for ns in snapshot.namespaces(target.nqn)
                  if value is not None and getattr(ns, kind) == value]
    if not candidates:
        return None
    states = {c.name: c.state for c in snapshot.controllers(target.nqn)}

    def rank(ns):
        live = any(states.get(c) == LIVE for c in ns.controllers())
        return (0 if live else 1, ns.name)
    return sorted(candidates, key=rank)[0]


@dataclasses.dataclass(frozen=True)
class PathReport:
    controller: str
    portal: str | None
    state: str
    ana_state: str | None

    def as_dict(self):
        return {"controller": self.controller, "portal": self.portal, "state": self.state,
                "ana_state": self.ana_state}


def owning_subsystem(snapshot: Snapshot, nqn: str, ns: Namespace | None) -> Subsystem | None:
    """The subsystem that holds ``ns`` (with no namespace: the first one of ``nqn``)."""
    subsystems = snapshot.for_nqn(nqn)
    return next((s for s in subsystems if ns is not None and s.name == ns.subsystem),
                subsystems[0] if subsystems else None)


def namespace_paths(subsys: Subsystem | None, ns: Namespace | None):
    """The paths of ``ns``: ``(controller, ANA state of ns there)`` for each controller of its
    subsystem that carries it; with no namespace, every controller of ``subsys``.

    The one answer to "which paths has this volume": the attach result, get_path_status and
    the CLI's ``paths`` and ``status`` all report these.  A controller of the subsystem that
    does not carry the namespace (one of another host NQN the namespace is not exposed to,
    one being deleted, one with native multipath off that shows its own copy) is no path of
    it.
    """
    if subsys is None:
        return ()
    if ns is None:
        return tuple((c, None) for c in subsys.controllers)
    ana = {p.controller: p.ana_state for p in ns.paths}
    carried = ns.controllers()
    return tuple((c, ana.get(c.name)) for c in subsys.controllers if c.name in carried)


def path_report(ns: Namespace | None, snapshot: Snapshot, nqn: str):
    """:func:`namespace_paths` of ``ns`` as :class:`PathReport` entries."""
    return tuple(PathReport(c.name, str(c.portal) if c.portal else None, c.state, ana)
                 for c, ana in namespace_paths(owning_subsystem(snapshot, nqn, ns), ns))


def accessible(ana_state):
    """May I/O use a path in this ANA state?  (None: the target reports no ANA.)"""
    return ana_state is None or ana_state in ANA_PREFERENCE


def usable_path(ns: Namespace, snapshot: Snapshot, nqn: str):
    """True when I/O can flow now: a live controller with an accessible ANA state."""
    states = {c.name: c.state for c in snapshot.controllers(nqn)}
    if ns.controller:
        return states.get(ns.controller) == LIVE
    return any(states.get(p.controller) == LIVE and accessible(p.ana_state) for p in ns.paths)


def best_ana_state(ns: Namespace, snapshot: Snapshot, nqn: str):
    """The best ANA state among live paths (``optimized`` beats ``non-optimized``)."""
    states = {c.name: c.state for c in snapshot.controllers(nqn)}
    live = [p.ana_state for p in ns.paths if states.get(p.controller) == LIVE]
    for wanted in ANA_PREFERENCE:
        if wanted in live:
            return wanted
    return live[0] if live else None


@dataclasses.dataclass(frozen=True)
class Release:
    """What a detach does with the controllers of one subsystem (for one host NQN).

    ``delete``: controllers to delete (empty when kept); ``keep``: why they stay, or None;
    ``check``: the subsystem's other namespaces, which the daemon checks again (open
    exclusively by anyone) right before it deletes.
    """
    namespace: Namespace | None
    controllers: tuple[str, ...]
    delete: tuple[str, ...]
    keep: str | None
    check: tuple[str, ...]


def plan_release(target: Target, snapshot: Snapshot, host_nqn, users=(), adopted=True,
                 in_use=None) -> Release:
    """Which controllers go when this host stops using ``target``'s volume.

    Reference counting: the controllers of (subsystem, host NQN) go when no other volume of
    this host holds the subsystem (``users``: their registry references), whatever other
    namespaces the target exports - except when one of those is in use here by anything
    else (``in_use``: {device name: reason}, mounted or held), and, for an *adopted*
    subsystem (controllers that predate the registry: made by an older release, os-brick or
    by hand, whose volumes the registry does not know), while it shows any other namespace.
    """
    ns = find_namespace(target, snapshot)
    ctrls = tuple(c.name for c in snapshot.controllers(target.nqn)
                  if host_nqn is None or c.hostnqn is None or c.hostnqn == host_nqn)
    kind, value = target.identity
    # with native multipath off the same namespace appears once per controller: not "others"
    others = [n for n in snapshot.namespaces(target.nqn) if getattr(n, kind) != value]
    check = tuple(sorted({n.device for n in others}))
    busy = sorted((n.name, (in_use or {})[n.name]) for n in others if n.name in (in_use or {}))
    keep = None
    if users:
        keep = "used by %d other volume(s) of this host" % len(users)
    elif busy:
        keep = "in use on this host: " + ", ".join("%s (%s)" % b for b in busy)
    elif adopted and others:
        keep = ("they predate the registry and the subsystem shows other namespaces (%s)"
                % ", ".join(n.name for n in others))
    return Release(ns, ctrls, () if keep else ctrls, keep, check if not keep else ())


INFINITE = float("inf")


def timeout_seconds(value):
    """A timeout as sysfs shows it or the policy gives it -> seconds; ``off`` or a negative
    value is infinite.  None when unknown (an older kernel does not show it)."""
    if value is None:
        return None
    if str(value).strip() == "off":
        return INFINITE
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        return None
    return INFINITE if seconds < 0 else seconds


def attr_updates(controllers, wanted: dict):
    """Timeout changes for controllers an attach reuses (it did not create them).

    -> {controller name: {attr: value}}, in the order to write them.  ``ctrl_loss_tmo`` and
    ``fast_io_fail_tmo`` only ever grow towards the policy: a controller someone made with
    ``-1`` (``off``, infinite) or a longer timeout keeps it.  ``reconnect_delay`` is set to the
    policy; the kernel keeps ctrl_loss_tmo as a number of reconnects, so after a changed delay
    a finite ctrl_loss_tmo is written again (at least its old seconds).  An attribute the
    kernel does not show (older kernels) is left alone.
    """
    out = {}
    for ctrl in controllers:
        diff = {}
        delay = timeout_seconds(ctrl.reconnect_delay)
        if wanted.get("reconnect_delay") is not None and delay not in (
                None, wanted["reconnect_delay"]):
            diff["reconnect_delay"] = wanted["reconnect_delay"]
        for attr in ("ctrl_loss_tmo", "fast_io_fail_tmo"):
            now = timeout_seconds(getattr(ctrl, attr))
            want = timeout_seconds(wanted.get(attr))
            if now is None or want is None:
                continue
            if want > now:
                diff[attr] = wanted[attr]
            elif attr == "ctrl_loss_tmo" and "reconnect_delay" in diff and now != INFINITE:
                diff[attr] = now                # keep the loss time in seconds
        if diff:
            out[ctrl.name] = diff
    return out

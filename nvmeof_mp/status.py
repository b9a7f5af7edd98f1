"""Path status for operators: subsystem, iopolicy, each path with states, and a verdict."""

from __future__ import annotations

from nvmeof_mp import plan as planner
from nvmeof_mp.topology import Namespace, Snapshot, Subsystem

HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"


def namespace_status(subsys: Subsystem, ns: Namespace | None, expected_portals=()):
    """A JSON-able report of one namespace (or of a subsystem whose namespace is missing)."""
    paths = [{"controller": c.name, "transport": c.transport,
              "portal": str(c.portal) if c.portal else None, "state": c.state,
              "ana_state": ana, "ctrl_loss_tmo": c.ctrl_loss_tmo,
              "reconnect_delay": c.reconnect_delay, "fast_io_fail_tmo": c.fast_io_fail_tmo,
              "kato": c.kato}
             for c, ana in planner.namespace_paths(subsys, ns)]
    present = {p["portal"] for p in paths}
    missing = [str(p) for p in expected_portals if str(p) not in present]
    usable = [p for p in paths if p["state"] == "live" and planner.accessible(p["ana_state"])]
    if ns is None or not usable:
        verdict = DOWN
    elif len(usable) < len(paths) or missing:
        verdict = DEGRADED
    else:
        verdict = HEALTHY
    return {"device": ns.device if ns else None, "subsystem": subsys.name, "nqn": subsys.nqn,
            "iopolicy": subsys.iopolicy, "uuid": ns.uuid if ns else None,
            "size_bytes": ns.size_bytes if ns else None, "paths": paths,
            "missing_portals": missing, "verdict": verdict}


def device_status(snapshot: Snapshot, device: str):
    name = device.rsplit("/", 1)[-1]
    found = snapshot.namespace(name)
    if found is None:
        return None
    return namespace_status(*found)


def target_status(snapshot: Snapshot, target):
    ns = planner.find_namespace(target, snapshot)
    subsys = planner.owning_subsystem(snapshot, target.nqn, ns)
    if subsys is None:
        return {"device": None, "nqn": target.nqn, "paths": [], "verdict": DOWN,
                "missing_portals": [str(p) for p in target.portals]}
    return namespace_status(subsys, ns, target.portals)


def format_text(report):
    lines = ["%s  %s  [%s]" % (report.get("device") or "(no device)", report.get("nqn"),
                               report["verdict"].upper())]
    if report.get("subsystem"):
        lines.append("  subsystem %s iopolicy=%s" % (report["subsystem"], report.get("iopolicy")))
    for p in report["paths"]:
        lines.append("  %-8s %-26s %-11s ana=%-14s ctrl_loss_tmo=%s fast_io_fail_tmo=%s" % (
            p["controller"], p["portal"], p["state"], p["ana_state"], p.get("ctrl_loss_tmo"),
            p.get("fast_io_fail_tmo")))
    for m in report.get("missing_portals", []):
        lines.append("  (missing) %s" % m)
    return "\n".join(lines)


def format_attachment(entry):
    """One registry attachment (``Connector.attachments``) as text: the volume, its state,
    the paths of each target, the last events."""
    import time
    state = entry["state"] + (" (INTERRUPTED: its process is gone)" if entry["interrupted"]
                              else "")
    lines = ["%s  %s  %s" % (entry.get("device") or "(no device)", entry.get("describe"),
                             state)]
    lines += ["  " + line for t in entry.get("targets") or () for line in
              format_text(t).splitlines()]
    for when, text in (entry.get("events") or [])[-5:]:
        lines.append("  %s  %s" % (time.strftime("%H:%M:%S", time.localtime(when)), text))
    return "\n".join(lines)

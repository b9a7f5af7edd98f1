"""One path report: the attach result, get_path_status and the CLI count the same controllers
as the paths of a namespace (plan.path_report and status.namespace_status agree)."""

import pytest

from nvmeof_mp import plan, status
from nvmeof_mp.topology import Controller, Namespace, Path, Snapshot, Subsystem

NQN = "nqn.2014-08.org.example:paths"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-4333-8444-555555555555"
OTHER_HOST = "nqn.2014-08.org.nvmexpress:uuid:66666666-7777-4888-9999-000000000000"


def ctrl(name, trsvcid, state="live", hostnqn=HOST):
    return Controller(name, NQN, state, "tcp", "127.0.0.1", trsvcid, hostnqn=hostnqn)


def snapshot(native):
    ctrls = (ctrl("nvme0", "4420"), ctrl("nvme1", "4421"),
             ctrl("nvme2", "4420", hostnqn=OTHER_HOST),      # another host NQN's controller
             ctrl("nvme3", "4422", state="deleting"))       # its namespace paths are gone
    if native:
        ns = Namespace("nvme0n1", "nvme-subsys0", 1, None, None, None, 2048,
                       paths=(Path("nvme0c0n1", "nvme0", "optimized", "1"),
                              Path("nvme0c1n1", "nvme1", "non-optimized", "1")))
        namespaces = (ns,)
    else:       # native multipath off: every controller shows a block device of its own
        ns = Namespace("nvme1n1", "nvme-subsys0", 1, None, None, None, 2048,
                       controller="nvme1")
        namespaces = (Namespace("nvme0n1", "nvme-subsys0", 1, None, None, None, 2048,
                                controller="nvme0"), ns)
    subsys = Subsystem("nvme-subsys0", NQN, "round-robin", ctrls, namespaces)
    return Snapshot((subsys,)), subsys, ns


@pytest.mark.parametrize("native", [True, False])
def test_attach_result_and_path_status_report_the_same_paths(native):
    snap, subsys, ns = snapshot(native)
    reported = [(p.controller, p.portal, p.state, p.ana_state)
                for p in plan.path_report(ns, snap, NQN)]
    shown = [(p["controller"], p["portal"], p["state"], p["ana_state"])
             for p in status.namespace_status(subsys, ns)["paths"]]
    assert reported == shown
    assert [p[0] for p in reported] == (["nvme0", "nvme1"] if native else ["nvme1"])


def test_a_subsystem_without_the_namespace_reports_every_controller():
    snap, subsys, _ = snapshot(True)
    assert [p.controller for p in plan.path_report(None, snap, NQN)] == [
        p["controller"] for p in status.namespace_status(subsys, None)["paths"]]


def test_a_path_the_kernel_has_not_scanned_yet_does_not_make_the_attach_degraded():
    """The attach waits for one usable path, not for every scan: a portal with a live
    controller whose namespace path is not there yet is on its way, not missing."""
    from nvmeof_mp.attach import TargetAttachment
    from nvmeof_mp.connection import parse
    from simlab import conninfo
    target = parse(conninfo(nqn=NQN)).targets[0]
    snap, _, ns = snapshot(True)
    first_only = tuple(p for p in plan.path_report(ns, snap, NQN) if p.controller == "nvme0")
    both = frozenset({str(target.portals[0]), str(target.portals[1])})
    assert not TargetAttachment(target, ns, (), (), first_only, True, both).degraded
    assert TargetAttachment(target, ns, (), (), first_only, True,
                            frozenset({str(target.portals[0])})).degraded

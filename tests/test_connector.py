"""The connector end to end against the simulated host (sysfs tree + fake kernel)."""

import os
import threading

import pytest

from nvmeof_mp.exception import (InvalidConnectionInfo, NVMeOFError, TargetUnreachable,
                                 VolumeDeviceNotFound)
from nvmeof_mp.sim import SimNamespace
from nvmeof_mp.sim import HOST_NQN

from simlab import NQN, P1, UUID, UUID2, conninfo


def test_native_multipath_attach_connects_each_portal_once_and_nothing_else(lab):
    lab.target()
    result = lab.connector.connect_volume(conninfo())
    assert result["type"] == "block" and result["path"] == "/dev/nvme0n1"
    # one kernel call for both portals, one controller creation per portal; the registry:
    # "attaching" with the subsystem's reference in that same call, "attached" after
    assert dict(lab.sim.calls) == {"connect_all": 1, "connect": 2, "registry_put": 1}
    assert [p["state"] for p in result["paths"]] == ["live", "live"]
    assert result["degraded"] is False
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    # one multipath head, two hidden paths
    assert lab.sysfs("class/block/nvme0c0n1/hidden") == "1"
    assert lab.sysfs("class/block/nvme0n1/uuid") == UUID


def test_single_path_uses_one_portal(lab):
    lab.target(ports=(4420,))
    result = lab.connector.connect_volume(conninfo(portals=[P1]))
    assert result["path"] == "/dev/nvme0n1"
    assert lab.sim.calls["connect"] == 1


def test_without_multipath_first_working_portal_is_used(make_lab):
    lab = make_lab(use_multipath=False)
    lab.target()
    lab.sim.portal(NQN, 4420).mode = "refuse"
    result = lab.connector.connect_volume(conninfo())
    assert lab.sim.calls["connect"] == 2            # tried 4420, then 4421
    assert lab.sim.controllers(NQN) == ["nvme0"]
    assert lab.sysfs("class/nvme/nvme0/address").startswith("traddr=127.0.0.1,trsvcid=4421")
    assert result["path"] == "/dev/nvme0n1"


def test_kernel_without_native_multipath_connects_one_portal(make_lab):
    lab = make_lab(native=False)
    lab.target()
    result = lab.connector.connect_volume(conninfo())
    assert lab.sim.calls["connect"] == 1
    assert result["path"] == "/dev/nvme0n1"
    assert lab.sysfs("class/block/nvme0n1/hidden") == "0"


def test_degraded_attach_when_one_portal_refuses(lab):
    lab.target()
    lab.sim.portal(NQN, 4421).mode = "refuse"
    result = lab.connector.connect_volume(conninfo())
    assert result["path"] == "/dev/nvme0n1"
    assert result["degraded"] is True
    assert result["failed_portals"] == ["tcp://127.0.0.1:4421"]


def test_connect_timing_out_on_one_portal_is_a_degraded_attach(lab):
    lab.target()
    lab.sim.portal(NQN, 4420).mode = "timeout"
    result = lab.connector.connect_volume(conninfo())
    assert result["failed_portals"] == ["tcp://127.0.0.1:4420"]
    assert result["path"] == "/dev/nvme0n1"


def test_all_portals_refusing_raises_and_leaves_nothing(lab):
    lab.target()
    for port in (4420, 4421):
        lab.sim.portal(NQN, port).mode = "refuse"
    with pytest.raises(TargetUnreachable) as exc:
        lab.connector.connect_volume(conninfo())
    assert "Connection refused" in str(exc.value)
    assert lab.sim.controllers() == []


def test_device_never_appearing_removes_only_the_controllers_this_call_created(lab):
    target = lab.target(ports=(4420, 4421, 4422), namespaces=((1, UUID), (2, UUID2)))
    target.hidden_nsids.add(2)
    lab.connector.connect_volume(conninfo(portals=[("127.0.0.1", 4420, "tcp")]))
    assert lab.sim.controllers() == ["nvme0"]
    before = lab.sim.clock.now
    with pytest.raises(VolumeDeviceNotFound):
        lab.connector.connect_volume(conninfo(uuid=UUID2, portals=[
            P1, ("127.0.0.1", 4421, "tcp"), ("127.0.0.1", 4422, "tcp")]))
    assert lab.sim.clock.now - before >= lab.connector.policy.device_timeout - 1e-6
    assert lab.sim.controllers() == ["nvme0"]       # pre-existing controller untouched
    assert os.path.exists(os.path.join(lab.root, "dev/nvme0n1"))


def test_failed_connect_does_not_disconnect_preexisting_controllers(lab):
    lab.target()
    lab.connector.connect_volume(conninfo(portals=[P1]))
    lab.sim.portal(NQN, 4421).mode = "refuse"
    result = lab.connector.connect_volume(conninfo())
    assert lab.sim.calls["delete_controller"] == 0
    assert result["degraded"] and lab.sim.controllers() == ["nvme0"]


def test_existing_controllers_are_reused(lab):
    lab.target()
    first = lab.connector.connect_volume(conninfo())
    calls = dict(lab.sim.calls)
    again = lab.connector.connect_volume(conninfo())
    assert again["path"] == first["path"]
    assert dict(lab.sim.calls) == calls              # no privileged call at all


def test_new_namespace_on_connected_subsystem_rescans_instead_of_connecting(lab):
    target = lab.target()
    lab.connector.connect_volume(conninfo())
    target.namespaces.append(SimNamespace(2, UUID2))
    result = lab.connector.connect_volume(conninfo(uuid=UUID2))
    assert lab.sim.calls["connect"] == 2
    assert lab.sim.calls["rescan_controllers"] == 1
    assert result["path"] == "/dev/nvme0n2"


def test_two_volumes_on_one_subsystem_never_get_each_others_device(lab):
    lab.target(namespaces=((1, UUID), (2, UUID2)))
    a = lab.connector.connect_volume(conninfo(uuid=UUID))
    b = lab.connector.connect_volume(conninfo(uuid=UUID2))
    assert a["path"] != b["path"]
    assert lab.sysfs("class/block", os.path.basename(b["path"]), "uuid") == UUID2
    assert lab.sysfs("class/block", os.path.basename(a["path"]), "uuid") == UUID


def test_detach_keeps_controllers_while_another_namespace_is_present(lab):
    lab.target(namespaces=((1, UUID), (2, UUID2)))
    lab.connector.connect_volume(conninfo(uuid=UUID))
    lab.connector.connect_volume(conninfo(uuid=UUID2))
    lab.connector.disconnect_volume(conninfo(uuid=UUID), None)
    assert lab.sim.controllers() == ["nvme0", "nvme1"]
    assert lab.sim.flushed == ["/dev/nvme0n1"]
    # the last volume of the subsystem takes the controllers with it
    lab.sim.targets[NQN].namespaces = [n for n in lab.sim.targets[NQN].namespaces
                                       if n.nsid == 2]
    for c in ("nvme0", "nvme1"):
        lab.sim.ctrls[c].namespaces.pop(1)
    os.unlink(os.path.join(lab.root, "sys/devices/virtual/nvme-subsystem/nvme-subsys0",
                           "nvme0n1/size"))
    lab.connector.disconnect_volume(conninfo(uuid=UUID2), None)
    assert lab.sim.controllers() == []


def test_detach_leaks_no_controller_and_flushes_first(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    # the flush must reach the device while its paths still exist (a flush after the
    # controllers went is no flush at all): note what the kernel has when it is asked
    flush, at_flush = lab.sim.flush_device, []
    lab.sim.flush_device = lambda path, *a: at_flush.append(lab.sim.controllers()) or flush(
        path, *a)
    lab.connector.disconnect_volume(conninfo(), {"path": "/dev/nvme0n1"})
    assert lab.sim.controllers() == []
    assert lab.sim.flushed == ["/dev/nvme0n1"]
    assert at_flush == [["nvme0", "nvme1"]]
    assert os.listdir(os.path.join(lab.root, "sys/class/nvme-subsystem")) == []
    assert lab.connector.get_volume_paths(conninfo()) == []


def test_disconnect_of_a_never_connected_volume_is_a_noop(lab):
    lab.target()
    lab.connector.disconnect_volume(conninfo(), None)
    assert sum(lab.sim.calls.values()) == 0


def test_flush_failure_stops_detach_unless_forced(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.flush_error = "flush /dev/nvme0n1: Input/output error"
    with pytest.raises(NVMeOFError, match="Input/output error"):
        lab.connector.disconnect_volume(conninfo(), None)
    assert lab.sim.controllers() == ["nvme0", "nvme1"]
    with pytest.raises(NVMeOFError, match="Input/output error"):    # os-brick: still raised
        lab.connector.disconnect_volume(conninfo(), None, force=True)
    assert lab.sim.controllers() == []


def test_ignore_errors_turns_errors_into_logs_only_past_a_forced_flush(lab, caplog):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.flush_error = "flush failed"
    with pytest.raises(NVMeOFError, match="flush failed"):      # as os-brick: not without force
        lab.connector.disconnect_volume(conninfo(), None, ignore_errors=True)
    assert lab.sim.controllers() == ["nvme0", "nvme1"]   # nothing deleted after a failed flush
    lab.connector.disconnect_volume(conninfo(), None, force=True, ignore_errors=True)
    assert "flush failed" in caplog.text
    assert lab.sim.controllers() == []


def test_invalid_connection_info_makes_no_privileged_call(lab):
    lab.target()
    with pytest.raises(InvalidConnectionInfo):
        lab.connector.connect_volume(conninfo(portals=[("127.0.0.1", 4420, "fc")]))
    with pytest.raises(InvalidConnectionInfo):
        lab.connector.disconnect_volume({"volume_replicas": [], "dm_replicas": []}, None)
    assert sum(lab.sim.calls.values()) == 0


def test_device_not_visible_immediately_after_connect(make_lab):
    lab = make_lab(ns_delay=2.5)
    lab.target()
    start = lab.sim.clock.now
    result = lab.connector.connect_volume(conninfo())
    assert result["path"] == "/dev/nvme0n1"
    waited = lab.sim.clock.now - start
    assert 2.5 <= waited < 2.7        # polled, not slept in big fixed steps


def test_all_portals_connecting_at_attach_time_waits_for_a_live_one(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)
    lab.sim.path_down(NQN, 4421)
    lab.sim.clock.at(3.0, lambda: lab.sim.path_up(NQN, 4421))   # live 1 s after that
    start = lab.sim.clock.now
    result = lab.connector.connect_volume(conninfo())
    assert lab.sim.calls["connect"] == 2              # no new controller for connecting ones
    assert lab.sim.clock.now - start >= 4.0
    states = {p["portal"]: p["state"] for p in result["paths"]}
    assert states == {"tcp://127.0.0.1:4420": "connecting", "tcp://127.0.0.1:4421": "live"}
    assert result["degraded"]


def test_controller_stuck_in_connecting_gives_device_not_found_and_cleanup(lab):
    lab.target()
    lab.sim.portal(NQN, 4420).mode = "stuck"
    lab.sim.portal(NQN, 4421).mode = "stuck"
    with pytest.raises(VolumeDeviceNotFound):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers() == []


def test_controller_matched_with_and_without_src_addr(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)          # address loses src_addr while reconnecting
    assert "src_addr" not in lab.sysfs("class/nvme/nvme0/address")
    lab.connector.connect_volume(conninfo())
    assert lab.sim.calls["connect"] == 2


def test_already_connected_race_with_another_process_is_tolerated(lab):
    lab.target()
    real_connect = lab.sim.connect

    def racing_connect(opts):
        real_connect(dict(opts))           # another process won the race...
        return {"error": "already connnected", "errno": 1, "already": True}
    lab.sim.connect = racing_connect
    result = lab.connector.connect_volume(conninfo())
    assert result["path"] == "/dev/nvme0n1"
    assert result["failed_portals"] == [] and not result["degraded"]


def test_device_names_with_two_digit_instances(lab):
    for i in range(10):
        lab.target(nqn="%s-%d" % (NQN, i), namespaces=((1, "00000000-0000-4000-8000-%012d" % i),))
        lab.connector.connect_volume(conninfo(nqn="%s-%d" % (NQN, i), portals=[P1],
                                              uuid="00000000-0000-4000-8000-%012d" % i))
    ids = [(n, "10000000-0000-4000-8000-%012d" % n) for n in range(1, 11)]
    lab.target(nqn=NQN + "-x", namespaces=ids)
    result = lab.connector.connect_volume(conninfo(nqn=NQN + "-x", uuid=ids[9][1]))
    assert result["path"] == "/dev/nvme10n10"
    assert lab.connector.get_volume_paths(conninfo(nqn=NQN + "-x", uuid=ids[9][1])) == [
        "/dev/nvme10n10"]


def test_nsid_and_nguid_identify_when_no_uuid(lab):
    nguid = "8d2f4f9a1b7e4c2a9a553f1e6c2b7d01"
    lab.sim.add_target(NQN, [("127.0.0.1", 4420)],
                       [SimNamespace(1, None, nguid="aaaaaaaa1b7e4c2a9a553f1e6c2b7d01"),
                        SimNamespace(2, None, nguid=nguid)])
    result = lab.connector.connect_volume({"nqn": NQN, "transport_type": "tcp",
                                           "target_portal": "127.0.0.1", "target_port": 4420,
                                           "volume_nguid": nguid})
    assert lab.sysfs("class/block", result["path"][5:], "nsid") == "2"
    by_nsid = lab.connector.connect_volume({"target_nqn": NQN, "portals": [P1], "ns_id": 1})
    assert lab.sysfs("class/block", by_nsid["path"][5:], "nsid") == "1"


def test_optimized_path_is_awaited_briefly(lab):
    lab.target()
    lab.sim.portal(NQN, 4420).ana = "non-optimized"
    lab.sim.portal(NQN, 4421).ana = "non-optimized"
    start = lab.sim.clock.now
    result = lab.connector.connect_volume(conninfo())
    assert lab.sim.clock.now - start >= lab.connector.policy.ana_wait
    assert {p["ana_state"] for p in result["paths"]} == {"non-optimized"}


def test_concurrent_attaches_of_different_subsystems(lab):
    import dataclasses
    n = 16
    for i in range(n):
        lab.target(nqn="%s-%d" % (NQN, i), namespaces=((1, "00000000-0000-4000-8000-%012d" % i),))
    results, errors = {}, []
    # the simulated clock is shared: every thread's poll sleeps advance it for all sixteen,
    # so under load one attach could see its device deadline pass on fake time alone
    patient = dataclasses.replace(lab.connector.policy, device_timeout=3600.0)

    def attach(i):
        try:
            c = lab.new_connector(policy=patient)
            results[i] = c.connect_volume(conninfo(nqn="%s-%d" % (NQN, i),
                                                   uuid="00000000-0000-4000-8000-%012d" % i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=attach, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors      # rare failure seen under load: say which
    assert len({r["path"] for r in results.values()}) == n
    assert lab.sim.calls["connect"] == 2 * n


def test_extend_returns_new_size_in_bytes(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.resize(NQN, 1, 262144)
    assert lab.connector.extend_volume(conninfo()) == 262144 * 512
    assert lab.sim.calls["rescan_controllers"] == 1


def test_per_volume_host_nqn_is_used(lab):
    lab.target()
    host_nqn = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
    lab.connector.connect_volume(conninfo(host_nqn=host_nqn))
    assert lab.sysfs("class/nvme/nvme0/hostnqn") == host_nqn


def test_replica_leg_timeouts_are_applied(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    assert lab.sysfs("class/nvme/nvme0/ctrl_loss_tmo") == "off"       # -1: reconnect forever
    assert lab.sysfs("class/nvme/nvme0/reconnect_delay") == "2"
    assert lab.sysfs("class/nvme/nvme0/fast_io_fail_tmo") == "off"


def test_subsystem_recreated_under_same_name_with_another_nqn(lab):
    """The NQN cache of the topology reader must not confuse re-created subsystems."""
    lab.target()
    lab.target(nqn=NQN + "-other", namespaces=((1, UUID2),))
    lab.connector.connect_volume(conninfo())
    lab.connector.disconnect_volume(conninfo(), None)
    other = conninfo(uuid=UUID2, nqn=NQN + "-other")
    result = lab.connector.connect_volume(other)            # gets nvme-subsys0 again
    assert os.listdir(os.path.join(lab.root, "sys/class/nvme-subsystem")) == ["nvme-subsys0"]
    assert lab.connector.get_volume_paths(other) == [result["path"]]
    assert lab.connector.get_volume_paths(conninfo()) == []


def test_attach_returns_after_udev_processed_the_device(make_lab):
    lab = make_lab(udev_delay=0.7)
    lab.target()
    start = lab.sim.clock.now
    result = lab.connector.connect_volume(conninfo())
    # udev gave the node its group (and links): the service user opens it
    assert lab.sim.can_open(os.path.join(lab.root, "dev", result["path"][5:]))
    assert lab.sim.clock.now - start >= 0.7


def test_same_subsystem_attaches_serialize_and_share_controllers(lab):
    lab.target(namespaces=((1, UUID), (2, UUID2)))
    results = {}

    def attach(uuid):
        results[uuid] = lab.new_connector().connect_volume(conninfo(uuid=uuid))
    threads = [threading.Thread(target=attach, args=(u,)) for u in (UUID, UUID2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lab.sim.calls["connect"] == 2          # the second attach reused both controllers
    assert results[UUID]["path"] != results[UUID2]["path"]


def test_check_valid_device_as_the_calling_process(lab, tmp_path):
    ok = tmp_path / "dev-ok"
    ok.write_bytes(b"\0" * 512)
    assert lab.connector.check_valid_device(str(ok), run_as_root=False) is True
    assert lab.connector.check_valid_device(str(tmp_path / "missing"), False) is False


def test_reused_controllers_get_the_timeout_policy(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    calls = lab.sim.calls["set_controller_attrs"]
    lab.connector.connect_volume(conninfo())           # already at the policy: no call
    assert lab.sim.calls["set_controller_attrs"] == calls
    with open(os.path.join(lab.root, "sys/class/nvme/nvme1/ctrl_loss_tmo"), "w") as f:
        f.write("30\n")                                 # e.g. connected by hand before
    lab.connector.connect_volume(conninfo())
    assert lab.sysfs("class/nvme/nvme1/ctrl_loss_tmo") == "off"     # raised, never lowered
    assert lab.sim.calls["set_controller_attrs"] == calls + 1


def test_check_paths_reconnects_a_controller_the_kernel_deleted(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)
    lab.sim.expire("nvme0")                             # ctrl_loss_tmo ran out
    lab.sim.portal(NQN, 4420).mode = "up"
    report = lab.connector.check_paths(conninfo())
    assert report["attached"] and report["healed"]
    assert report["before"][0]["verdict"] == "degraded"
    assert report["after"][0]["verdict"] == "healthy"
    assert len(lab.sim.controllers(NQN)) == 2


def test_check_paths_leaves_an_unattached_volume_alone(lab):
    lab.target()
    report = lab.connector.check_paths(conninfo())
    assert report == {"attached": False, "healed": False, "before": report["before"],
                      "after": report["before"]}
    assert sum(lab.sim.calls.values()) == 0


def test_dhchap_secret_reaches_the_kernel_but_no_log(lab, caplog):
    import logging
    secret = "DHHC-1:00:ia6zGodOr4SEG0Zzaw398rpY0wqipUWj4jWjUh4HWUz6aQ2n:"
    lab.target()
    seen = []
    real = lab.sim.connect
    lab.sim.connect = lambda opts: seen.append(opts.get("dhchap_secret")) or real(opts)
    caplog.set_level(logging.DEBUG)
    lab.connector.connect_volume(conninfo(dhchap_secret=secret))
    assert seen == [secret, secret]
    assert secret not in caplog.text
    assert "'dhchap_secret': '***'" in caplog.text      # the request is logged, redacted


def _attach_time(lab, info, mode=None, root=False):
    import dataclasses
    lab.sim.caller_root = root
    conn = lab.connector if mode is None else lab.new_connector(
        policy=dataclasses.replace(lab.connector.policy, wait_for_udev=mode))
    start = lab.sim.clock.now
    result = conn.connect_volume(info)
    return lab.sim.clock.now - start, result


@pytest.mark.parametrize("mode,root,waits", [
    ("never", False, False),
    ("auto", True, False),        # root can open the node before udev chmods it
    ("auto", False, True),        # the default service user cannot: wait
    ("always", True, True),
])
def test_udev_wait_modes(make_lab, mode, root, waits):
    lab = make_lab(udev_delay=0.7)
    lab.target()
    took, result = _attach_time(lab, conninfo(), mode, root)
    assert (took >= 0.7) is waits
    node = os.path.join(lab.root, result["path"].lstrip("/"))
    assert lab.sim.can_open(node) is (root or waits)    # "never" may hand out a root-only node


def test_auto_udev_wait_still_waits_for_replica_legs(make_lab):
    """Legs must be udev-processed before mdadm touches them, even for a root caller."""
    from test_replicated import raid_info
    lab = make_lab(udev_delay=0.7)
    lab.target(nqn=NQN + "-a", ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQN + "-b", ports=(4421,), namespaces=((1, UUID2),))
    took, result = _attach_time(lab, raid_info(), root=True)
    assert result["path"] == "/dev/md/vol1" and took >= 0.7
    for leg in lab.sim.md["vol1"]["legs"]:
        dev = lab.sysfs("class/block", os.path.basename(leg), "dev")
        assert os.path.exists(os.path.join(lab.root, "run/udev/data", "b" + dev))


def test_wait_for_udev_accepts_booleans_and_refuses_nonsense():
    from nvmeof_mp.policy import TimeoutPolicy
    assert TimeoutPolicy(wait_for_udev=True).wait_for_udev == "always"
    assert TimeoutPolicy(wait_for_udev=False).wait_for_udev == "never"
    with pytest.raises(ValueError, match="wait_for_udev"):
        TimeoutPolicy(wait_for_udev="sometimes")




def test_light_snapshot_reads_only_what_readiness_needs(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    full = lab.connector.sysfs.snapshot([NQN])
    light = lab.connector.sysfs.snapshot([NQN], detail=False)
    assert [c.hostnqn for c in full.controllers()] == [HOST_NQN] * 2
    assert [c.hostnqn for c in light.controllers()] == [None, None]
    # what readiness and the path report use is the same in both
    assert [(c.name, c.state, c.portal) for c in light.controllers()] == [
        (c.name, c.state, c.portal) for c in full.controllers()]
    assert [(n.name, n.uuid, n.size_sectors, [(p.name, p.ana_state) for p in n.paths])
            for n in light.namespaces()] == [
        (n.name, n.uuid, n.size_sectors, [(p.name, p.ana_state) for p in n.paths])
        for n in full.namespaces()]


@pytest.mark.parametrize("native", [True, False])
def test_has_namespaces_is_the_cheap_form_of_the_snapshot(make_lab, native):
    lab = make_lab(native=native)
    lab.target()
    reader = lab.connector.sysfs
    assert not reader.has_namespaces(NQN)
    lab.sim.ns_delay = 5.0                       # controllers live, namespace scan pending
    lab.connector.kernel.connect(dict(nqn=NQN, traddr="127.0.0.1", trsvcid="4420",
                                      transport="tcp"))
    assert reader.snapshot([NQN]).controllers() and not reader.has_namespaces(NQN)
    lab.sim.clock.sleep(5.0)
    assert reader.has_namespaces(NQN) and reader.snapshot([NQN]).namespaces()
    assert not reader.has_namespaces(NQN + "-other")


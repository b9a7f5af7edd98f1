"""Detach safety: bounded flushes, force semantics, nothing left behind (issue 12, items 5
and 13) - on the simulated host, plus the privileged pieces that need no daemon."""

import os

import pytest

from nvmeof_mp.privileged import storage


def test_md_stop_without_udev_removes_the_dangling_alias_link(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(storage, "_run", lambda argv: calls.append(argv) or
                        {"ok": True, "out": "", "error": ""})
    md = tmp_path / "md"
    md.mkdir()
    os.symlink("../md127", md / "vol1")              # no udev: nobody removes it
    (tmp_path / "md126").write_text("")
    os.symlink("../md126", md / "other")             # still points at a device: kept
    result = storage.stop_array("vol1", dev=str(tmp_path))
    assert result["ok"] and calls == [["mdadm", "--stop", "/dev/md/vol1"]]
    assert not os.path.lexists(md / "vol1")
    assert os.path.islink(md / "other")


def test_md_stop_keeps_the_link_when_the_stop_failed_or_it_still_resolves(tmp_path,
                                                                           monkeypatch):
    md = tmp_path / "md"
    md.mkdir()
    os.symlink("../md127", md / "vol1")
    monkeypatch.setattr(storage, "_run", lambda argv: {"ok": False, "out": "",
                                                       "error": "mdadm: busy"})
    assert not storage.stop_array("vol1", dev=str(tmp_path))["ok"]
    assert os.path.islink(md / "vol1")
    monkeypatch.setattr(storage, "_run", lambda argv: {"ok": True, "out": "", "error": ""})
    (tmp_path / "md127").write_text("")              # udev re-made it for a new array
    storage.stop_array("vol1", dev=str(tmp_path))
    assert os.path.islink(md / "vol1")


def test_md_stop_stops_the_array_device_when_its_link_is_gone(tmp_path, monkeypatch):
    """Seen on the real kernel: after every leg died udev dropped /dev/md/<alias>; stopping
    by the link failed ("error opening"), md127 stayed.  The node found in mdadm's map is
    stopped instead."""
    calls = []
    monkeypatch.setattr(storage, "_run", lambda argv: calls.append(argv) or
                        {"ok": True, "out": "", "error": ""})
    monkeypatch.setattr(storage, "_find_array", lambda md, devices: "/dev/md127")
    monkeypatch.setattr(storage, "not_ours", lambda array, name: None)
    assert body_of(storage.md_stop)("vol1")["ok"]
    assert calls == [["mdadm", "--stop", "/dev/md127"]]


def test_md_stop_stops_an_emptied_array_whose_link_is_gone(tmp_path, monkeypatch):
    """Every leg died and was deleted, udev dropped /dev/md/<alias>: the caller names the node
    it saw; an array holding no device is stopped (no data to lose), one that still holds
    devices only when it is ours."""
    calls = []
    monkeypatch.setattr(storage, "_run", lambda argv: calls.append(argv) or
                        {"ok": True, "out": "", "error": ""})
    monkeypatch.setattr(storage, "_find_array", lambda md, devices: None)
    monkeypatch.setattr(storage, "SYS_BLOCK", str(tmp_path))
    (tmp_path / "md127" / "slaves").mkdir(parents=True)
    assert body_of(storage.md_stop)("vol1", "/dev/md127")["ok"]
    assert calls == [["mdadm", "--stop", "/dev/md127"]]
    (tmp_path / "md127" / "slaves" / "nvme0n1").mkdir()       # still holds a device
    monkeypatch.setattr(storage, "not_ours", lambda array, name: "not ours")
    assert not body_of(storage.md_stop)("vol1", "/dev/md127")["ok"]
    assert len(calls) == 1
    from nvmeof_mp.exception import PrivilegedArgumentError
    with pytest.raises(PrivilegedArgumentError):
        body_of(storage.md_stop)("vol1", "/dev/sda")


def body_of(entrypoint):
    return entrypoint.args[0]


# -- bounded detach: the flush never waits for a path that cannot answer ----------------------

import threading  # noqa: E402


from nvmeof_mp.exception import NVMeOFError  # noqa: E402
from nvmeof_mp.privileged import host  # noqa: E402

from simlab import NQN, UUID, UUID2, conninfo  # noqa: E402
from test_replicated import NQA, NQB, UUID_TOP, dm_info  # noqa: E402


def all_paths_down(lab, nqn=NQN, ports=(4420, 4421)):
    for port in ports:
        lab.sim.path_down(nqn, port)


@pytest.mark.parametrize("native", [True, False])
def test_detach_with_every_path_dead_fails_fast_and_keeps_the_volume(make_lab, native):
    lab = make_lab(native=native)
    lab.target()
    lab.connector.connect_volume(conninfo())
    ctrls = lab.sim.controllers()
    all_paths_down(lab)
    start = lab.sim.clock.now
    with pytest.raises(NVMeOFError, match="no live path"):
        lab.connector.disconnect_volume(conninfo(), None)
    assert lab.sim.clock.now - start < 1.0
    assert lab.sim.controllers() == ctrls           # queued data kept; a retry or force decides
    assert lab.sim.calls["flush_device"] == 0       # a flush could only have queued


@pytest.mark.parametrize("native", [True, False])
def test_forced_detach_with_every_path_dead_deletes_at_once(make_lab, native):
    lab = make_lab(native=native)
    lab.target()
    lab.connector.connect_volume(conninfo())
    all_paths_down(lab)
    start = lab.sim.clock.now
    lab.connector.disconnect_volume(conninfo(), None, force=True, ignore_errors=True)
    assert lab.sim.clock.now - start < 1.0
    assert lab.sim.controllers() == []
    assert lab.connector.get_volume_paths(conninfo()) == []


def test_forced_detach_reports_the_skipped_flush(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    all_paths_down(lab)
    from nvmeof_mp import connection
    errors = lab.connector.attacher.detach(connection.parse(conninfo()).target, force=True)
    assert any("no live path" in e for e in errors)
    assert lab.sim.controllers() == []


def test_a_flush_that_hangs_gives_up_after_flush_timeout(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.flush_hangs.add("/dev/nvme0n1")      # live paths, but the target never answers
    start = lab.sim.clock.now
    with pytest.raises(NVMeOFError, match="no answer"):
        lab.connector.disconnect_volume(conninfo(), None)
    assert lab.sim.clock.now - start == pytest.approx(lab.connector.policy.flush_timeout)
    assert lab.sim.controllers() == ["nvme0", "nvme1"]
    lab.connector.disconnect_volume(conninfo(), None, force=True, ignore_errors=True)
    assert lab.sim.controllers() == []


def test_flush_timeout_is_a_policy_value(lab):
    from nvmeof_mp import config
    from oslo_config import cfg
    conf = cfg.ConfigOpts()
    config.register(conf)
    conf([])
    conf.set_override("flush_timeout", 7.5, group=config.GROUP)
    assert config.policy_from_conf(conf).flush_timeout == 7.5


@pytest.fixture
def two(lab):
    lab.target(nqn=NQA, ports=(4420, 4422), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421, 4423), namespaces=((1, UUID2),))
    return lab


def fail_every_dm_path(lab):
    for dev in lab.sim.dm[UUID_TOP]["paths"]:
        lab.sim.dm_message(UUID_TOP, "fail_path", dev)


def test_dm_detach_with_no_active_path_fails_fast_and_keeps_queueing(two):
    two.connector.connect_volume(dm_info())
    fail_every_dm_path(two)
    start = two.sim.clock.now
    with pytest.raises(NVMeOFError, match="no active path"):
        two.connector.disconnect_volume(dm_info(), None)
    assert two.sim.clock.now - start < 1.0
    assert two.sim.dm[UUID_TOP]["queueing"] and len(two.sim.controllers()) == 2


def test_forced_dm_detach_with_no_active_path_stops_queueing_first(two):
    two.connector.connect_volume(dm_info())
    fail_every_dm_path(two)                 # the test's own dm_message calls: not counted
    calls = []
    message, remove = two.sim.dm_message, two.sim.dm_remove
    two.sim.dm_message = lambda name, msg, *a: calls.append(msg) or message(name, msg, *a)
    two.sim.dm_remove = lambda name: calls.append("remove") or remove(name)
    start = two.sim.clock.now
    two.connector.disconnect_volume(dm_info(), None, force=True, ignore_errors=True)
    assert two.sim.clock.now - start < 1.0
    assert two.sim.dm == {} and two.sim.controllers() == []
    # the map stopped queueing before it was removed (queued I/O fails instead of hanging)
    assert calls == ["fail_if_no_path", "remove"]


def test_dm_flush_that_hangs_gives_up_and_leaves_the_map_queueing(two):
    two.connector.connect_volume(dm_info())
    two.sim.flush_hangs.add("/dev/mapper/" + UUID_TOP)
    start = two.sim.clock.now
    with pytest.raises(NVMeOFError, match="no answer"):
        two.connector.disconnect_volume(dm_info(), None)
    assert two.sim.clock.now - start == pytest.approx(two.connector.policy.flush_timeout)
    assert two.sim.dm[UUID_TOP]["queueing"] and len(two.sim.controllers()) == 2
    two.connector.disconnect_volume(dm_info(), None, force=True, ignore_errors=True)
    assert two.sim.dm == {} and two.sim.controllers() == []


def test_forced_dm_detach_stops_queueing_before_it_flushes(two):
    """The legs died without I/O, so the map still shows its paths active: a forced detach
    must not wait flush_timeout for a flush that can only queue (the gate's bound)."""
    two.connector.connect_volume(dm_info())
    two.sim.flush_hangs.add("/dev/mapper/" + UUID_TOP)
    start = two.sim.clock.now
    two.connector.disconnect_volume(dm_info(), None, force=True, ignore_errors=True)
    assert two.sim.clock.now - start < 1.0
    assert two.sim.dm == {} and two.sim.controllers() == []


# -- the daemon's flush: fsync in a thread, given up after the deadline -----------------------

def test_daemon_flush_gives_up_after_the_deadline_and_does_not_pile_up(monkeypatch):
    release = threading.Event()
    started = []

    def stuck(path):
        started.append(path)
        release.wait(10)
        return None
    monkeypatch.setattr(host, "_flush", stuck)
    err = host.bounded_flush("/dev/nvme0n1", 0.05)
    assert "no answer after 0.05s" in err
    err = host.bounded_flush("/dev/nvme0n1", 0.05)     # the first is still blocked
    assert "still blocked" in err and len(started) == 1
    release.set()
    for _ in range(200):
        if "/dev/nvme0n1" not in host._IN_FLIGHT:
            break
        threading.Event().wait(0.01)
    assert host.bounded_flush("/dev/nvme0n1", 1.0) is None and len(started) == 2


def test_daemon_flush_returns_the_flush_error(monkeypatch):
    monkeypatch.setattr(host, "_flush", lambda path: "flush %s: Input/output error" % path)
    assert host.bounded_flush("/dev/md/vol1", 1.0) == "flush /dev/md/vol1: Input/output error"


@pytest.mark.parametrize("timeout", [0, -1, True, "5", 100000])
def test_daemon_flush_timeout_is_validated(timeout):
    from nvmeof_mp.exception import PrivilegedArgumentError
    with pytest.raises(PrivilegedArgumentError):
        host.flush_timeout(timeout)


# -- extend_volume: no needless wait, replicas together (issue 12, item 12) -------------------

from test_replicated import dm_info as _dm_info, raid_info  # noqa: E402

NEW = 262144


def test_extend_returns_at_once_when_the_kernel_already_shows_the_new_size(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.resize(NQN, 1, NEW)
    lab.sim.rescan_controllers(lab.sim.controllers())      # the target's AEN did the rescan
    start, rescans = lab.sim.clock.now, lab.sim.calls["rescan_controllers"]
    assert lab.connector.extend_volume(conninfo()) == NEW * 512
    assert lab.sim.clock.now - start < 0.5
    assert lab.sim.calls["rescan_controllers"] == rescans   # nothing to rescan


def test_extend_rescans_and_returns_as_soon_as_sysfs_shows_the_target_size(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.resize(NQN, 1, NEW)
    start = lab.sim.clock.now
    assert lab.connector.extend_volume(conninfo()) == NEW * 512
    assert lab.sim.clock.now - start < 0.5
    assert lab.sim.calls["namespace_size"] == 1
    assert lab.sysfs("class/block/nvme0n1/size") == str(NEW)     # the host sees it now


def test_extend_without_identify_falls_back_to_waiting_for_a_change(lab, monkeypatch):
    lab.target()
    lab.connector.connect_volume(conninfo())
    monkeypatch.setattr(lab.sim, "namespace_size", lambda device: None)
    lab.sim.resize(NQN, 1, NEW)
    assert lab.connector.extend_volume(conninfo()) == NEW * 512


def test_extend_of_a_volume_whose_size_did_not_change_returns_the_size_at_once(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    start = lab.sim.clock.now
    assert lab.connector.extend_volume(conninfo()) == 131072 * 512
    assert lab.sim.clock.now - start < 0.5


@pytest.mark.parametrize("info", [raid_info, _dm_info])
def test_replicas_are_extended_together(two, info):
    two.connector.connect_volume(info())
    for nqn in (NQA, NQB):
        two.sim.resize(nqn, 1, NEW)
    real = two.sim.rescan_controllers
    both = threading.Barrier(2, timeout=2)

    def rescan(names):          # returns only when the other replica's rescan is in flight
        both.wait()
        return real(names)
    two.sim.rescan_controllers = rescan
    size = two.connector.extend_volume(info())
    # what the host's device shows: md keeps 1 MiB of each leg for its superblock
    device = "md%d" % two.sim.md["vol1"]["minor"] if info is raid_info else None
    assert size == (NEW - 2048 if device else NEW) * 512
    if device:
        assert two.sysfs("class/block", device, "size") == str(NEW - 2048)
    else:
        assert two.sim.dm[UUID_TOP]["size"] == NEW


def test_identify_namespace_data_gives_the_size_in_bytes():
    from nvmeof_mp.privileged import nvme
    data = bytearray(4096)
    data[0:8] = (1 << 20).to_bytes(8, "little")        # NSZE in logical blocks
    data[25] = 1                                        # NLBAF: two formats
    data[26] = 1                                        # FLBAS: format 1 in use
    data[128 + 2] = 9                                   # format 0: 512 B
    data[132 + 2] = 12                                  # format 1: 4 KiB
    assert nvme.identify_size(bytes(data)) == (1 << 20) * 4096
    data[132 + 2] = 0                                   # no sane LBA size: unknown
    assert nvme.identify_size(bytes(data)) is None


@pytest.mark.parametrize("path", ["/dev/nvme0", "/dev/md/x", "/dev/nvme0n1p1",
                                  "/dev/../dev/nvme0n1", "nvme0n1", None])
def test_identify_refuses_other_devices(path):
    from nvmeof_mp.exception import PrivilegedArgumentError
    from nvmeof_mp.privileged import nvme
    with pytest.raises(PrivilegedArgumentError):
        nvme.namespace_device(path)


def test_identify_command_layout():
    from nvmeof_mp.privileged import nvme
    cmd = nvme.identify_command(nsid=3, addr=0x1000, length=4096)
    assert len(cmd) == 72 and cmd[0] == 0x06
    assert int.from_bytes(cmd[4:8], "little") == 3                  # nsid
    assert int.from_bytes(cmd[24:32], "little") == 0x1000           # addr
    assert int.from_bytes(cmd[36:40], "little") == 4096             # data_len
    assert int.from_bytes(cmd[40:44], "little") == 0                # cdw10: CNS 0
    assert int.from_bytes(cmd[64:68], "little") == nvme.IDENTIFY_TIMEOUT_MS


def test_forced_dm_detach_retries_a_failed_map_removal_after_the_legs_are_gone(two):
    two.connector.connect_volume(dm_info())
    real, calls = two.sim.dm_remove, []

    def busy_once(name):
        calls.append(name)
        if len(calls) == 1:         # the stuck flush still holds it open
            return {"ok": False, "out": "", "error": "device-mapper: remove ioctl: busy"}
        return real(name)
    two.sim.dm_remove = busy_once
    two.connector.disconnect_volume(dm_info(), None, force=True, ignore_errors=True)
    assert len(calls) == 2 and two.sim.dm == {} and two.sim.controllers() == []


# -- RAID detach waits (bounded) for udev's pending events ------------------------------------

def _raid_with_udev_queue(make_lab):
    lab = make_lab(udev_delay=0.05)
    lab.target(nqn=NQA, ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421,), namespaces=((1, UUID2),))
    lab.connector.connect_volume(raid_info())
    queue = os.path.join(lab.root, "run/udev/queue")
    with open(queue, "w"):
        pass                    # udev still has events (a leg's resize) to process
    stopped = []
    real = lab.sim.md_stop
    lab.sim.md_stop = lambda name, node=None: stopped.append(lab.sim.clock.now) or real(name)
    return lab, queue, stopped


def test_raid_detach_lets_udev_finish_its_queue_before_the_stop(make_lab):
    """A leg's change event handled after the stop makes udev's mdadm --incremental start
    an array of its own over the legs, left behind once the legs are gone."""
    lab, queue, stopped = _raid_with_udev_queue(make_lab)
    start = lab.sim.clock.now
    lab.sim.clock.at(1.0, lambda: os.unlink(queue))
    lab.connector.disconnect_volume(raid_info(), None)
    assert stopped and stopped[0] - start >= 1.0
    assert lab.sim.md == {} and lab.sim.controllers() == []


def test_raid_detach_waits_for_udev_a_bounded_time(make_lab):
    lab, queue, stopped = _raid_with_udev_queue(make_lab)
    start = lab.sim.clock.now
    lab.connector.disconnect_volume(raid_info(), None)     # the queue never drains
    assert 1.0 <= stopped[0] - start <= 6.0
    assert lab.sim.md == {} and lab.sim.controllers() == []

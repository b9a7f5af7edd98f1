"""RAID1 (volume_replicas) and dm-multipath (dm_replicas) on the simulated host."""

import os

import pytest

from nvmeof_mp.exception import (InvalidConnectionInfo, ReplicaError, UnsupportedHost,
                                 VolumeDeviceNotFound)

from simlab import NQN, UUID, UUID2

UUID_TOP = "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11"
NQA, NQB = NQN + "-a", NQN + "-b"


def replica(nqn, uuid, ports):
    return {"target_nqn": nqn, "vol_uuid": uuid,
            "portals": [["127.0.0.1", p, "tcp"] for p in ports]}


def raid_info(count=None):
    info = {"volume_replicas": [replica(NQA, UUID, [4420]), replica(NQB, UUID2, [4421])],
            "alias": "vol1"}
    if count is not None:
        info["replica_count"] = count
    return info


def dm_info(ports_a=(4420,), ports_b=(4421,)):
    return {"vol_uuid": UUID_TOP, "dm_replicas": [replica(NQA, UUID, ports_a),
                                                  replica(NQB, UUID2, ports_b)]}


@pytest.fixture
def two(lab):
    lab.target(nqn=NQA, ports=(4420, 4422), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421, 4423), namespaces=((1, UUID2),))
    return lab


def test_raid_creates_array_over_both_legs(two):
    result = two.connector.connect_volume(raid_info())
    assert result["path"] == "/dev/md/vol1" and not result["degraded"]
    md = two.sim.md["vol1"]
    assert sorted(md["legs"]) == ["/dev/nvme0n1", "/dev/nvme1n1"]
    assert two.sim.calls["md_create"] == 1
    # legs get the replica timeout policy: fast failover
    assert two.sysfs("class/nvme/nvme0/fast_io_fail_tmo") == "1"
    assert two.connector.get_volume_paths(raid_info()) == ["/dev/md/vol1"]


def test_raid_is_not_created_with_a_leg_missing(two):
    """os-brick's rule: a new array needs every leg (the absent one may hold the data)."""
    two.sim.portal(NQB, 4421).mode = "refuse"
    with pytest.raises(ReplicaError, match="1 of 2 legs found"):
        two.connector.connect_volume(raid_info())
    assert two.sim.md == {} and two.sim.controllers() == []
    assert two.sim.calls["md_create"] == 0 and two.sim.superblocks == {}


def test_raid_all_replicas_failing_is_an_error_with_nothing_left(two):
    for nqn, port in ((NQA, 4420), (NQB, 4421)):
        two.sim.portal(nqn, port).mode = "refuse"
    with pytest.raises(ReplicaError, match="no replica"):
        two.connector.connect_volume(raid_info())
    assert two.sim.controllers() == [] and two.sim.md == {}


def test_raid_leg_fails_after_attach_and_is_readded(two):
    two.connector.connect_volume(raid_info())
    two.sim.md_fail("vol1", "/dev/nvme1n1")
    two.sim.path_down(NQB, 4421)
    two.sim.path_up(NQB, 4421)
    two.sim.clock.sleep(2)
    result = two.connector.connect_volume(raid_info())        # heal path: re-add
    assert two.sim.md["vol1"]["legs"]["/dev/nvme1n1"] == "active"
    assert not result["degraded"]


def test_raid_reassembles_legs_with_superblocks(two):
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info(), None)
    assert two.sim.md == {} and two.sim.controllers() == []
    result = two.connector.connect_volume(raid_info())
    assert result["path"] == "/dev/md/vol1"
    assert two.sim.calls["md_create"] == 1 and two.sim.calls["md_assemble"] == 1


def kernel_calls(sim, *names):
    """Note each call of the simulated kernel's ``names`` with the controllers it has then
    (the end state alone says nothing of the order: the sim records any call it gets)."""
    seen = []
    for name in names:
        real = getattr(sim, name)

        def call(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, sim.controllers()))
            return _real(*args, **kwargs)
        setattr(sim, name, call)
    return seen


def test_raid_detach_with_degraded_array(two):
    two.connector.connect_volume(raid_info())
    two.sim.md_fail("vol1", "/dev/nvme1n1")
    two.sim.path_down(NQB, 4421)
    seen = kernel_calls(two.sim, "flush_device", "md_stop")
    two.connector.disconnect_volume(raid_info(), None)
    assert two.sim.md == {} and two.sim.controllers() == []
    assert two.sim.flushed == ["/dev/md/vol1"]
    # flushed and stopped while its legs are still there, the legs go after
    assert seen == [("flush_device", ["nvme0", "nvme1"]), ("md_stop", ["nvme0", "nvme1"])]


def test_raid_replica_count_one_is_the_replicas_own_device(two):
    """As os-brick: one replica without an md superblock needs no md."""
    info = {"volume_replicas": [replica(NQA, UUID, [4420])], "replica_count": 1, "alias": "v1"}
    result = two.connector.connect_volume(info)
    assert result["path"] == "/dev/nvme0n1" and two.sim.md == {}
    assert two.sim.calls["md_create"] == 0


def test_raid_native_multipath_legs_connect_every_portal(two):
    info = {"volume_replicas": [replica(NQA, UUID, [4420, 4422]),
                                replica(NQB, UUID2, [4421, 4423])], "alias": "vol1"}
    two.connector.connect_volume(info)
    assert two.sim.calls["connect"] == 4 and len(two.sim.controllers()) == 4


def test_raid_extend_grows_the_array(two):
    two.connector.connect_volume(raid_info())
    before = two.sim.md["vol1"]["size"]
    two.sim.resize(NQA, 1, 262144)
    two.sim.resize(NQB, 1, 262144)
    size = two.connector.extend_volume(raid_info())
    assert size == (262144 - 2048) * 512 and size > before * 512


def test_dm_builds_one_map_over_the_replicas(two):
    result = two.connector.connect_volume(dm_info())
    assert result["path"] == "/dev/mapper/" + UUID_TOP and not result["degraded"]
    table = two.sim.dm[UUID_TOP]
    assert len(table["paths"]) == 2 and table["size"] == 131072
    assert two.connector.get_volume_paths(dm_info()) == ["/dev/mapper/" + UUID_TOP]


def test_dm_over_native_multipathed_replicas(two):
    result = two.connector.connect_volume(dm_info((4420, 4422), (4421, 4423)))
    assert two.sim.calls["connect"] == 4
    assert len(two.sim.dm[UUID_TOP]["paths"]) == 2
    assert [len(r["device"]) > 0 for r in result["replicas"]] == [True, True]


def test_dm_replica_fails_and_comes_back(two):
    two.sim.portal(NQB, 4421).mode = "refuse"
    first = two.connector.connect_volume(dm_info())
    assert first["degraded"] and len(two.sim.dm[UUID_TOP]["paths"]) == 1
    two.sim.portal(NQB, 4421).mode = "up"
    second = two.connector.connect_volume(dm_info())
    assert not second["degraded"] and len(two.sim.dm[UUID_TOP]["paths"]) == 2
    # a path dm failed is reinstated when the volume is attached (healed) again
    dev = next(iter(two.sim.dm[UUID_TOP]["paths"]))
    two.sim.dm[UUID_TOP]["paths"][dev] = "F"
    two.connector.connect_volume(dm_info())
    assert two.sim.dm[UUID_TOP]["paths"][dev] == "A"


def test_dm_detach_removes_map_then_controllers(two):
    two.connector.connect_volume(dm_info())
    seen = kernel_calls(two.sim, "flush_device", "dm_remove")
    two.connector.disconnect_volume(dm_info(), None)
    assert seen == [("flush_device", ["nvme0", "nvme1"]), ("dm_remove", ["nvme0", "nvme1"])]
    assert two.sim.dm == {} and two.sim.controllers() == []
    assert not os.path.exists(os.path.join(two.root, "dev/mapper", UUID_TOP))


def test_dm_without_dmsetup(two, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnsupportedHost, match="dmsetup"):
        two.connector.connect_volume(dict(dm_info(), enforce_multipath=True))
    assert sum(two.sim.calls.values()) == 0
    result = two.connector.connect_volume(dm_info())
    assert two.sysfs("class/block", result["path"][5:], "uuid") == UUID   # first replica
    assert result["degraded"]


def test_both_replica_keys_fail_before_any_privileged_call(two):
    info = dict(raid_info(), dm_replicas=dm_info()["dm_replicas"], vol_uuid=UUID_TOP)
    with pytest.raises(InvalidConnectionInfo, match="dm_replicas"):
        two.connector.connect_volume(info)
    assert sum(two.sim.calls.values()) == 0


def test_duplicate_ids_across_subsystems_are_ignored_by_the_kernel(two):
    two.target(nqn=NQN + "-c", ports=(4424,), namespaces=((1, UUID),))
    two.connector.connect_volume({"target_nqn": NQA, "vol_uuid": UUID,
                                  "portals": [["127.0.0.1", 4420, "tcp"]]})
    with pytest.raises(VolumeDeviceNotFound):
        two.connector.connect_volume({"target_nqn": NQN + "-c", "vol_uuid": UUID,
                                      "portals": [["127.0.0.1", 4424, "tcp"]]})
    assert any("duplicate IDs" in line for line in two.sim.log)


def test_dm_extend_reloads_the_map_with_the_new_size(two):
    two.connector.connect_volume(dm_info())
    two.sim.resize(NQA, 1, 262144)
    two.sim.resize(NQB, 1, 262144)
    assert two.connector.extend_volume(dm_info()) == 262144 * 512
    assert two.sim.dm[UUID_TOP]["size"] == 262144
    assert two.sim.calls["dm_create"] == 1 and two.sim.calls["dm_reload"] == 1


def test_check_paths_readds_a_failed_raid_leg(two):
    two.connector.connect_volume(raid_info())
    two.sim.md_fail("vol1", "/dev/nvme1n1")
    report = two.connector.check_paths(raid_info())
    assert report["attached"]
    assert two.sim.md["vol1"]["legs"]["/dev/nvme1n1"] == "active"


# -- a failed connect leaves the host as it was (each md / dm step failing) -------------------

class Boom(RuntimeError):
    """Not an NVMeOFError: a privsep transport error, a bug, anything unexpected."""


def failing(sim, name, when=lambda *a: True):
    real = getattr(sim, name)

    def call(*args, **kwargs):
        if when(*args):
            raise Boom("%s exploded" % name)
        return real(*args, **kwargs)
    setattr(sim, name, call)


def assert_host_clean(lab):
    assert lab.sim.controllers() == [] and lab.sim.md == {} and lab.sim.dm == {}
    assert not os.path.exists(os.path.join(lab.root, "dev/md/vol1"))


def test_raid_replica_attach_raising_in_the_pool_undoes_the_other_legs(two):
    failing(two.sim, "connect", lambda opts: opts["nqn"] == NQB)
    with pytest.raises(Boom):
        two.connector.connect_volume(raid_info())
    assert_host_clean(two)


def test_dm_replica_attach_raising_in_the_pool_undoes_the_other_legs(two):
    failing(two.sim, "connect", lambda opts: opts["nqn"] == NQB)
    with pytest.raises(Boom):
        two.connector.connect_volume(dm_info())
    assert_host_clean(two)


@pytest.mark.parametrize("step", ["md_examine", "md_create"])
def test_raid_step_raising_leaves_nothing_behind(two, step):
    failing(two.sim, step)
    with pytest.raises(Boom):
        two.connector.connect_volume(raid_info())
    assert_host_clean(two)


def test_raid_assemble_raising_leaves_nothing_behind(two):
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info(), None)
    real = two.sim.md_assemble

    def half_assembled(name, devices):
        real(name, devices)             # the array came up, then something broke
        raise Boom("md_assemble exploded")
    two.sim.md_assemble = half_assembled
    with pytest.raises(Boom):
        two.connector.connect_volume(raid_info())
    assert_host_clean(two)


def test_raid_create_that_started_the_array_but_failed_is_stopped(two):
    real = two.sim.md_create

    def started_but_failed(name, devices, raid_devices):
        real(name, devices, raid_devices)
        return {"ok": False, "out": "", "error": "mdadm: failed to set bitmap"}
    two.sim.md_create = started_but_failed
    with pytest.raises(ReplicaError, match="bitmap"):
        two.connector.connect_volume(raid_info())
    assert_host_clean(two)


def test_raid_heal_failing_keeps_the_running_array_and_its_legs(two):
    two.connector.connect_volume(raid_info())
    before = two.sim.controllers()
    two.sim.expire("nvme1")                  # leg B gone; a heal re-attach brings it back
    failing(two.sim, "md_assemble")
    with pytest.raises(Boom):
        two.connector.connect_volume(raid_info())
    assert "vol1" in two.sim.md                                 # running array kept
    assert two.sim.controllers() == [before[0]]                 # leg A kept, new leg B undone
    assert os.path.exists(os.path.join(two.root, "dev/md/vol1"))


@pytest.mark.parametrize("step", ["dm_create", "dm_status"])
def test_dm_step_raising_leaves_nothing_behind(two, step):
    failing(two.sim, step)
    with pytest.raises(Boom):
        two.connector.connect_volume(dm_info())
    assert_host_clean(two)
    assert not os.path.exists(os.path.join(two.root, "dev/mapper", UUID_TOP))


def test_dm_create_that_made_the_map_but_failed_is_removed(two):
    real = two.sim.dm_create

    def made_but_failed(name, size, devnums):
        real(name, size, devnums)
        return {"ok": False, "out": "", "error": "resume failed"}
    two.sim.dm_create = made_but_failed
    with pytest.raises(ReplicaError, match="resume"):
        two.connector.connect_volume(dm_info())
    assert_host_clean(two)


def test_dm_unreadable_device_number_fails_cleanly(two, monkeypatch):
    from nvmeof_mp import replicas
    monkeypatch.setattr(replicas, "block_attr", lambda *a: None)
    with pytest.raises(ReplicaError, match="device number"):
        two.connector.connect_volume(dm_info())
    assert two.sim.calls.get("dm_create", 0) == 0
    assert_host_clean(two)


def test_dm_heal_failing_keeps_the_map(two):
    two.connector.connect_volume(dm_info())
    before = two.sim.controllers()
    for dev in two.sim.dm[UUID_TOP]["paths"]:
        two.sim.dm[UUID_TOP]["paths"][dev] = "F"
    two.sim.expire("nvme1")
    failing(two.sim, "dm_message")
    with pytest.raises(Boom):
        two.connector.connect_volume(dm_info())
    assert UUID_TOP in two.sim.dm and two.sim.controllers() == [before[0]]


@pytest.mark.parametrize("info", [raid_info(), dm_info()], ids=["raid", "dm"])
def test_legs_on_a_kernel_without_fast_io_fail_tmo_fail_over_by_ctrl_loss_tmo(make_lab, info):
    """Linux before 5.11 (Debian's 5.10) rejects ``fast_io_fail_tmo`` (EINVAL): legs are
    connected without it, with a short ctrl_loss_tmo instead, so I/O on a lost leg still
    fails (when the kernel gives the controller up) instead of queueing forever."""
    old = make_lab(native=False, kernel_release="5.10.0-32-amd64")
    old.target(nqn=NQA, ports=(4420, 4422), namespaces=((1, UUID),))
    old.target(nqn=NQB, ports=(4421, 4423), namespaces=((1, UUID2),))
    result = old.connector.connect_volume(info)
    assert not result.get("degraded")
    for ctrl in ("nvme0", "nvme1"):
        assert old.sysfs("class/nvme", ctrl, "fast_io_fail_tmo") == "off"
        assert old.sysfs("class/nvme", ctrl, "ctrl_loss_tmo") == "2"
    old.connector.disconnect_volume(info, result)
    assert old.sim.controllers() == []


def test_a_single_path_on_a_kernel_without_fast_io_fail_tmo_keeps_reconnecting(make_lab):
    from simlab import conninfo
    old = make_lab(native=False, kernel_release="5.10.0-32-amd64")
    old.target()
    old.connector.connect_volume(conninfo(portals=(("127.0.0.1", 4420, "tcp"),)))
    assert old.sysfs("class/nvme/nvme0/ctrl_loss_tmo") == "off"


def test_dm_without_dmsetup_honours_the_factorys_enforce_multipath(two, monkeypatch):
    """Nova passes enforce_multipath to the connector factory, not in the connection info:
    without dmsetup a dm volume must be refused then too, not attached as one replica."""
    monkeypatch.setenv("PATH", "/nonexistent")
    two.connector.enforce_multipath = True
    with pytest.raises(UnsupportedHost, match="dmsetup"):
        two.connector.connect_volume(dm_info())
    assert sum(two.sim.calls.values()) == 0

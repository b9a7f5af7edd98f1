"""md RAID1 safety: legs must be NVMe-oF namespaces, arrays must be ours, data is never
overwritten (issue 13, items 3 and 7), and what Cinder's KumoScale driver sends (item 8)."""

import os

import pytest

from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import host
from nvmeof_mp.sim import SimHost, SimNamespace

from simlab import NQN, UUID, fabrics_host


def _pcie(sys, native):
    """A local PCIe disk as the kernel shows it: nvme9 (transport pcie) with namespace
    nvme9n1, under the PCI device, or with native multipath under nvme-subsys9."""
    ctrl = os.path.join(sys, "devices/pci0000:00/0000:00:04.0/nvme/nvme9")
    os.makedirs(ctrl)
    with open(os.path.join(ctrl, "transport"), "w") as f:
        f.write("pcie\n")
    if native:
        sdir = os.path.join(sys, "devices/virtual/nvme-subsystem/nvme-subsys9")
        os.makedirs(os.path.join(sdir, "nvme9n1"))
        os.symlink(ctrl, os.path.join(sdir, "nvme9"))
        os.symlink(sdir, os.path.join(sys, "class/nvme-subsystem/nvme-subsys9"))
        os.symlink(os.path.join(sdir, "nvme9n1"), os.path.join(sys, "class/block/nvme9n1"))
    else:
        os.makedirs(os.path.join(ctrl, "nvme9n1"))
        os.symlink(os.path.join(ctrl, "nvme9n1"), os.path.join(sys, "class/block/nvme9n1"))


@pytest.mark.parametrize("native", [True, False])
def test_fabrics_namespace_accepts_tcp_and_refuses_pcie(tmp_path, monkeypatch, native):
    sim = SimHost(str(tmp_path / "host"), native_multipath=native)
    sim.add_target(NQN, [("127.0.0.1", 4420)], [SimNamespace(1, UUID)])
    sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420", "transport": "tcp"})
    sim.clock.sleep(5)               # the namespace shows up after a while
    _pcie(sim.sys, native)
    monkeypatch.setattr(host, "SYS", sim.sys)
    dev = "/dev/" + next(iter(sim.ctrls.values())).namespaces[1]
    assert host.fabrics_namespace(dev) == dev
    assert host.fabrics_namespace(dev[5:]) == dev
    with pytest.raises(PrivilegedArgumentError, match="not an NVMe-oF namespace"):
        host.fabrics_namespace("/dev/nvme9n1")
    with pytest.raises(PrivilegedArgumentError, match="not an NVMe-oF namespace"):
        host.fabrics_namespace("/dev/nvme7n1")          # gone
    for bad in ("/dev/sda", "/dev/nvme0n1/../sda", "/dev/nvme0c0n1", None):
        with pytest.raises(PrivilegedArgumentError):
            host.fabrics_namespace(bad)


def test_fabrics_namespace_refuses_a_subsystem_with_a_pcie_controller(tmp_path, monkeypatch):
    sim = SimHost(str(tmp_path / "host"), native_multipath=True)
    sim.add_target(NQN, [("127.0.0.1", 4420)], [SimNamespace(1, UUID)])
    sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420", "transport": "tcp"})
    sim.clock.sleep(5)               # the namespace shows up after a while
    ctrl = next(iter(sim.ctrls.values()))
    with open(os.path.join(sim.sys, "class/nvme", ctrl.name, "transport"), "w") as f:
        f.write("pcie\n")
    monkeypatch.setattr(host, "SYS", sim.sys)
    with pytest.raises(PrivilegedArgumentError, match="pcie"):
        host.fabrics_namespace("/dev/" + ctrl.namespaces[1])


# -- the plan: what to do with the legs found (plain values) -----------------------------------

from nvmeof_mp import raid                                             # noqa: E402
from nvmeof_mp.exception import ReplicaError                           # noqa: E402

from simlab import UUID2                                               # noqa: E402

OURS = {"MD_NAME": "any:vol1", "MD_UUID": "6e766d65:6f666d70:00000001:00000001",
        "MD_EVENTS": "7"}
OTHER = {"MD_NAME": "host:data", "MD_UUID": "11111111:22222222:33333333:44444444"}


def test_plan_creates_only_over_every_leg_blank():
    assert raid.plan("vol1", 2, [("a", None), ("b", None)]).action == "create"
    refused = raid.plan("vol1", 2, [("a", None)])
    assert refused.action == "refuse" and "1 of 2 legs" in refused.reason
    refused = raid.plan("vol1", 2, [("a", None), ("b", OTHER)])
    assert refused.action == "refuse" and "another array" in refused.reason


def test_plan_assembles_from_our_legs_adds_blank_ones_and_leaves_foreign_ones_out():
    p = raid.plan("vol1", 3, [("a", OURS), ("b", None), ("c", OTHER)])
    assert (p.action, p.members, p.add) == ("assemble", ["a"], ["b"])
    assert [leg for leg, _ in p.left_out] == ["c"]
    # a leg absent: degraded assemble from the legs that carry the array (availability)
    assert raid.plan("vol1", 2, [("a", OURS)]).members == ["a"]
    # two arrays of the same name: which one holds the data is unknown
    split = dict(OURS, MD_UUID="6e766d65:6f666d70:00000002:00000002")
    assert raid.plan("vol1", 2, [("a", OURS), ("b", split)]).action == "refuse"


def test_plan_single_replica_is_its_own_device_unless_it_carries_our_array():
    assert raid.plan("v", 1, [("a", None)]) == raid.Plan("device", members=["a"])
    assert raid.plan("vol1", 1, [("a", OURS)]).action == "assemble"
    p = raid.plan("vol1", 1, [("a", OTHER)])        # a guest's own md inside the disk
    assert p == raid.Plan("device", members=["a"])


def test_md_name_is_the_alias_or_a_stable_31_byte_derivation():
    assert raid.md_name("vol1") == "vol1"
    assert raid.md_name("x" * 31) == "x" * 31
    assert len(raid.md_name("x" * 32)) == 31       # mdadm keeps 31 (the gate saw it)
    long = "volume-" + UUID
    name = raid.md_name(long)
    assert len(name.encode()) == 31 and name.startswith("volume-" + UUID[:15] + "-")
    assert name == raid.md_name(long) != raid.md_name("volume-" + UUID2)


# -- end to end on the simulated host: no sequence overwrites a leg holding data ---------------

NQA, NQB = NQN + "-a", NQN + "-b"


def replica(nqn, uuid, ports):
    return {"target_nqn": nqn, "vol_uuid": uuid,
            "portals": [["127.0.0.1", p, "tcp"] for p in ports]}


def raid_info(alias="vol1"):
    return {"volume_replicas": [replica(NQA, UUID, [4420]), replica(NQB, UUID2, [4421])],
            "replica_count": 2, "alias": alias}


@pytest.fixture
def two(lab):
    lab.target(nqn=NQA, ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421,), namespaces=((1, UUID2),))
    return lab


def _sb(lab, nqn):
    return lab.sim.superblocks.get((nqn, 1))


def _dev(lab, nqn):
    return "/dev/" + next(c.namespaces[1] for c in lab.sim.ctrls.values() if c.nqn == nqn)


def test_data_leg_absent_with_a_blank_replacement_is_refused_then_healed(two):
    two.connector.connect_volume(raid_info())
    two.sim.md_write("vol1")
    two.connector.disconnect_volume(raid_info())
    del two.sim.superblocks[(NQB, 1)]               # replica B re-made blank by the backend
    two.sim.portal(NQA, 4420).mode = "refuse"       # the leg with the data is away
    with pytest.raises(ReplicaError, match="1 of 2 legs"):
        two.connector.connect_volume(raid_info())
    assert two.sim.md == {} and _sb(two, NQB) is None and two.sim.calls["md_create"] == 1
    two.sim.portal(NQA, 4420).mode = "up"           # back: assembled from A, B added blank
    result = two.connector.connect_volume(raid_info())
    assert not result["degraded"] and two.sim.calls["md_create"] == 1
    assert _sb(two, NQB)["uuid"] == _sb(two, NQA)["uuid"] == two.sim.md["vol1"]["uuid"]


def test_a_leg_of_another_array_is_never_added(two):
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info())
    other = {"name": "data", "uuid": "11111111:22222222:33333333:44444444", "events": 9}
    two.sim.superblocks[(NQB, 1)] = dict(other)
    result = two.connector.connect_volume(raid_info())
    assert result["degraded"] and list(two.sim.md["vol1"]["legs"]) == [_dev(two, NQA)]
    assert "another array" in result["replicas"][1]["error"]
    assert _sb(two, NQB) == other
    assert two.sim.calls.get("md_add", 0) == 0


def test_a_stale_leg_returning_after_writes_is_re_added(two):
    two.connector.connect_volume(raid_info())
    two.sim.md_fail("vol1", _dev(two, NQB))
    two.sim.md_write("vol1")
    two.sim.md_write("vol1")
    assert _sb(two, NQB)["events"] < _sb(two, NQA)["events"]
    result = two.connector.connect_volume(raid_info())         # heal
    assert not result["degraded"]
    assert two.sim.md["vol1"]["legs"][_dev(two, NQB)] == "active"
    assert two.sim.calls.get("md_add", 0) == 0


def test_a_leg_ahead_of_the_array_is_left_out_not_overwritten(two):
    two.connector.connect_volume(raid_info())
    two.sim.md_fail("vol1", _dev(two, NQA))                     # A falls behind
    for _ in range(3):
        two.sim.md_write("vol1")
    two.connector.disconnect_volume(raid_info())
    two.sim.portal(NQB, 4421).mode = "refuse"                   # only the stale A comes
    assert two.connector.connect_volume(raid_info())["degraded"]
    two.sim.md_write("vol1")
    b_before = dict(_sb(two, NQB))
    two.sim.portal(NQB, 4421).mode = "up"
    result = two.connector.connect_volume(raid_info())          # B returns, ahead
    assert result["degraded"] and "left out" in result["replicas"][1]["error"]
    assert _sb(two, NQB) == b_before and two.sim.calls.get("md_add", 0) == 0


def test_a_leg_with_a_split_history_but_a_lower_event_count_is_left_out(two):
    """The defect the gate saw on 6.12: B ran without A (and took writes), then A ran alone
    and updated its superblock more often.  B's event count is below the array's, but its
    own superblock records A missing: split history, never re-added over B's writes."""
    two.connector.connect_volume(raid_info())
    two.sim.md_fail("vol1", _dev(two, NQA))                     # A away, B takes writes
    two.sim.md_write("vol1")
    two.connector.disconnect_volume(raid_info())
    two.sim.portal(NQB, 4421).mode = "refuse"                   # only A comes back
    assert two.connector.connect_volume(raid_info())["degraded"]
    for _ in range(5):
        two.sim.md_write("vol1")                                # A takes other writes
    b_before = dict(_sb(two, NQB))
    assert b_before["events"] < two.sim.md["vol1"]["events"]    # not "ahead" by count
    two.sim.portal(NQB, 4421).mode = "up"
    result = two.connector.connect_volume(raid_info())
    assert result["degraded"] and "split history" in result["replicas"][1]["error"]
    assert list(two.sim.md["vol1"]["legs"]) == [_dev(two, NQA)]
    assert _sb(two, NQB) == b_before


# -- what Cinder's KumoScale driver sends ------------------------------------------------------

KUMO_ALIAS = "volume-" + UUID                       # 43 characters


def kumo_single():
    return {"vol_uuid": UUID, "alias": KUMO_ALIAS, "writable": True, "replica_count": 1,
            "volume_replicas": [{"vol_uuid": UUID, "target_nqn": NQA,
                                 "portals": [("127.0.0.1", "4420", "TCP")]}]}


def test_kumoscale_single_replica_is_the_namespace_itself(two):
    info = kumo_single()
    result = two.connector.connect_volume(info)
    assert result["path"] == "/dev/nvme0n1" and two.sim.md == {}
    assert two.connector.get_volume_paths(info) == ["/dev/nvme0n1"]
    two.sim.resize(NQA, 1, 262144)
    assert two.connector.extend_volume(info) == 262144 * 512
    assert two.connector.check_paths(info)["attached"]
    two.connector.disconnect_volume(info)
    assert two.sim.controllers() == [] and two.connector.get_volume_paths(info) == []


def test_single_replica_carrying_our_array_is_assembled(two):
    info = kumo_single()
    name = raid.md_name(KUMO_ALIAS)
    two.sim.superblocks[(NQA, 1)] = {"name": name, "uuid": "6e766d65:6f666d70:0:1",
                                     "events": 4}
    result = two.connector.connect_volume(info)
    assert result["path"] == "/dev/md/" + name and name in two.sim.md
    assert two.connector.get_volume_paths(info) == ["/dev/md/" + name]
    two.connector.disconnect_volume(info)
    assert two.sim.md == {} and two.sim.controllers() == []


def test_a_long_multi_replica_alias_gets_a_stable_md_name(two):
    info = raid_info("volume-" + UUID)
    result = two.connector.connect_volume(info)
    name = raid.md_name("volume-" + UUID)
    assert result["path"] == "/dev/md/" + name and len(name) == 31
    assert two.connector.get_volume_paths(info) == ["/dev/md/" + name]
    two.connector.disconnect_volume(info)
    assert two.sim.md == {}


# -- the daemon re-checks: fabrics legs, the marker, blank before add --------------------------

from nvmeof_mp import privileged                                       # noqa: E402
from nvmeof_mp.privileged import storage                               # noqa: E402

MARKED = storage.MD_UUID_PREFIX + "0a0b0c0d:01020304"


class FakeMdadm:
    """``storage._run`` answering as mdadm: --examine/--detail from dicts, the rest ok."""

    def __init__(self):
        self.examine, self.detail, self.calls = {}, {}, []

    def __call__(self, argv):
        self.calls.append(argv)
        if argv[1] in ("--examine", "--detail"):
            info = (self.examine if argv[1] == "--examine" else self.detail).get(argv[-1])
            if info is None:
                return {"ok": False, "out": "", "error": "mdadm: No md superblock detected"}
            return {"ok": True, "error": "",
                    "out": "".join("%s=%s\n" % kv for kv in info.items())}
        return {"ok": True, "out": "", "error": ""}

    def acted(self):
        return [a for a in self.calls if a[1] not in ("--examine", "--detail")]


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """Two fabrics namespaces (nvme0n1, nvme1n1) and a PCIe disk nvme9n1, mdadm faked."""
    sim = fabrics_host(str(tmp_path / "host"))
    _pcie(sim.sys, False)
    monkeypatch.setattr(host, "SYS", sim.sys)
    monkeypatch.setattr(storage, "DEV", os.path.join(sim.root, "dev"))
    monkeypatch.setattr(privileged.default, "client_mode", False)      # in-process
    fake = FakeMdadm()
    monkeypatch.setattr(storage, "_run", fake)
    return fake


def _sb_of(name, uuid=MARKED, events=5):
    return {"MD_LEVEL": "raid1", "MD_NAME": "any:" + name, "MD_UUID": uuid,
            "MD_EVENTS": str(events)}


def _running(fake, name, uuid=MARKED, members=("/dev/nvme0n1", "/dev/nvme1n1")):
    link = os.path.join(storage.DEV, "md", name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    open(os.path.join(storage.DEV, "md127"), "w").close()
    os.symlink("../md127", link)
    info = dict(_sb_of(name, uuid))
    for m in members:
        info["MD_DEVICE_dev_%s_DEV" % m[5:]] = m
    fake.detail["/dev/md/" + name] = info


def test_daemon_md_legs_must_be_fabrics_namespaces(daemon):
    for call in (lambda: storage.md_create("vol1", ["/dev/nvme0n1", "/dev/nvme9n1"], 2),
                 lambda: storage.md_assemble("vol1", ["/dev/nvme9n1"]),
                 lambda: storage.md_examine("/dev/nvme9n1")):
        with pytest.raises(PrivilegedArgumentError, match="not an NVMe-oF namespace"):
            call()
    assert daemon.calls == []


def test_daemon_create_marks_the_array_and_needs_every_leg_blank(daemon):
    with pytest.raises(PrivilegedArgumentError, match="every leg"):
        storage.md_create("vol1", ["/dev/nvme0n1"], 2)        # no "missing" slot any more
    daemon.examine["/dev/nvme1n1"] = _sb_of("vol1")
    result = storage.md_create("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"], 2)
    assert not result["ok"] and "not created over" in result["error"]
    assert daemon.acted() == []
    del daemon.examine["/dev/nvme1n1"]
    assert storage.md_create("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"], 2)["ok"]
    create = daemon.acted()[-1]
    uuid = next(a for a in create if a.startswith("--uuid="))[len("--uuid="):]
    assert uuid.startswith(storage.MD_UUID_PREFIX) and "missing" not in create


def test_daemon_stop_and_grow_refuse_an_array_not_ours(daemon):
    _running(daemon, "vol1", uuid="11111111:22222222:33333333:44444444",
             members=("/dev/nvme9n1",))                  # a local array under that name
    for call in (storage.md_stop, storage.md_grow):
        result = call("vol1")
        assert not result["ok"] and "not ours" in result["error"]
    daemon.detail["/dev/md/vol1"]["MD_NAME"] = "host:root"
    assert "not an array this library made" in storage.md_stop("vol1")["error"]
    assert daemon.acted() == []


def test_daemon_stop_and_grow_act_on_marked_and_legacy_arrays(daemon):
    _running(daemon, "vol1")
    assert storage.md_grow("vol1")["ok"] and storage.md_stop("vol1")["ok"]
    # made before the marker (os-brick, older releases): adopted when named exactly so
    daemon.detail["/dev/md/vol1"]["MD_UUID"] = "11111111:22222222:33333333:44444444"
    assert storage.md_stop("vol1")["ok"]
    assert [a[1] for a in daemon.acted()] == ["--grow", "--stop", "--stop"]


def test_daemon_assemble_never_adds_nor_re_adds_and_re_add_takes_only_legs_of_the_array(daemon):
    daemon.examine["/dev/nvme0n1"] = _sb_of("vol1")
    daemon.examine["/dev/nvme1n1"] = _sb_of("other")
    result = storage.md_assemble("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"])
    assert not result["ok"] and "/dev/nvme1n1" in result["error"] and daemon.acted() == []
    daemon.examine["/dev/nvme1n1"] = _sb_of("vol1", "6e766d65:6f666d70:99999999:99999999")
    result = storage.md_assemble("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"])
    assert not result["ok"] and "different arrays" in result["error"]
    assert not storage.md_re_add("vol1", "/dev/nvme1n1")["ok"]      # no array running yet
    _running(daemon, "vol1", members=("/dev/nvme0n1",))
    assert not storage.md_re_add("vol1", "/dev/nvme1n1")["ok"]      # another array's leg
    daemon.examine["/dev/nvme1n1"] = _sb_of("vol1")
    storage.md_assemble("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"])
    verbs = [a[3] for a in daemon.acted() if a[1] == "--manage"]
    assert "--add" not in verbs and "--re-add" not in verbs
    assert storage.md_re_add("vol1", "/dev/nvme1n1")["ok"]
    assert daemon.acted()[-1] == ["mdadm", "--manage", "/dev/md/vol1", "--re-add",
                                  "/dev/nvme1n1"]
    daemon.examine["/dev/nvme1n1"] = _sb_of("data")
    assert not storage.md_re_add("vol1", "/dev/nvme1n1")["ok"]
    with pytest.raises(PrivilegedArgumentError):
        storage.md_re_add("vol1", "/dev/nvme9n1")


def test_an_array_udev_left_inactive_is_stopped_then_assembled_from_every_leg(two):
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info())
    two.sim.md_inactive = {"vol1"}
    result = two.connector.connect_volume(raid_info())
    assert not result["degraded"] and two.sim.calls["md_stop_inactive"] == 1
    assert two.sim.calls["md_assemble"] == 2 and two.sim.md_inactive == set()


def test_daemon_answers_an_inactive_array_and_stops_only_an_inactive_one_of_the_legs(daemon):
    daemon.examine["/dev/nvme0n1"] = _sb_of("vol1")
    assert not storage.md_stop_inactive("vol1", ["/dev/nvme0n1"])["ok"]  # nothing there
    _running(daemon, "vol1", members=("/dev/nvme0n1",))
    state = os.path.join(host.SYS, "block/md127/md/array_state")
    os.makedirs(os.path.dirname(state))
    with open(state, "w") as f:
        f.write("active\n")
    assert not storage.md_stop_inactive("vol1", ["/dev/nvme0n1"])["ok"]  # running: no
    with open(state, "w") as f:
        f.write("inactive\n")
    result = storage.md_assemble("vol1", ["/dev/nvme0n1"])
    assert not result["ok"] and result["inactive"] and daemon.acted() == []
    daemon.detail["/dev/md/vol1"]["MD_UUID"] = storage.MD_UUID_PREFIX + "99999999:99999999"
    assert not storage.md_stop_inactive("vol1", ["/dev/nvme0n1"])["ok"]  # another array
    daemon.detail["/dev/md/vol1"]["MD_UUID"] = MARKED
    assert storage.md_stop_inactive("vol1", ["/dev/nvme0n1"])["ok"]
    assert daemon.acted() == [["mdadm", "--stop", "/dev/md/vol1"]]


def test_daemon_assemble_refuses_to_adopt_a_running_array_of_another_uuid(daemon):
    daemon.examine["/dev/nvme0n1"] = _sb_of("vol1")
    _running(daemon, "vol1", uuid=storage.MD_UUID_PREFIX + "99999999:99999999")
    result = storage.md_assemble("vol1", ["/dev/nvme0n1"])
    assert not result["ok"] and "not the array of these legs" in result["error"]
    assert daemon.acted() == []


def test_daemon_add_only_blank_legs_to_our_array(daemon):
    _running(daemon, "vol1", members=("/dev/nvme0n1",))
    daemon.examine["/dev/nvme1n1"] = _sb_of("vol1", events=9)
    result = storage.md_add("vol1", "/dev/nvme1n1")
    assert not result["ok"] and "never added over" in result["error"]
    del daemon.examine["/dev/nvme1n1"]
    assert storage.md_add("vol1", "/dev/nvme1n1")["ok"]
    assert daemon.acted() == [["mdadm", "--manage", "/dev/md/vol1", "--add", "/dev/nvme1n1"]]
    with pytest.raises(PrivilegedArgumentError):
        storage.md_add("vol1", "/dev/nvme9n1")


def test_replica_count_above_the_listed_replicas_assembles_but_never_creates(two):
    """KumoScale sends replica_count = the volume's replicas and one entry per target it
    could publish: a replica whose backend is away is simply not listed."""
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info())
    only_a = dict(raid_info(), volume_replicas=raid_info()["volume_replicas"][:1])
    result = two.connector.connect_volume(only_a)               # degraded assemble from A
    assert result["degraded"] and two.sim.calls["md_create"] == 1
    two.connector.disconnect_volume(only_a)
    two.sim.superblocks.clear()                                 # a volume never attached
    with pytest.raises(ReplicaError, match="1 of 2 legs"):
        two.connector.connect_volume(only_a)


def test_daemon_stop_tolerates_a_member_whose_namespace_is_gone(daemon):
    """Detach with a dead leg: md still lists it, its controller is deleted already."""
    _running(daemon, "vol1", members=("/dev/nvme0n1", "/dev/nvme5n1"))
    assert storage.md_stop("vol1")["ok"]


def test_an_array_made_before_the_marker_is_adopted_under_its_exact_name(two):
    """os-brick and older releases: no marker, superblock name == alias: assembled."""
    for nqn in (NQA, NQB):
        two.sim.superblocks[(nqn, 1)] = {"name": "vol1", "events": 3,
                                         "uuid": "11111111:22222222:33333333:44444444"}
    result = two.connector.connect_volume(raid_info())
    assert not result["degraded"] and two.sim.calls["md_create"] == 0
    assert two.sim.md["vol1"]["uuid"] == "11111111:22222222:33333333:44444444"


def test_daemon_stops_our_array_whose_legs_all_died_and_whose_name_is_unreadable(daemon):
    """Every leg dead: mdadm reads no superblock, so --detail shows our marked UUID but no
    name (Linux 6.12).  Found through its own /dev/md/<name> link, the array is ours."""
    _running(daemon, "vol1", uuid="656d766e:706d666f:adf358b3:b06ac474")  # as 6.12 showed
    del daemon.detail["/dev/md/vol1"]["MD_NAME"]
    assert storage.md_stop("vol1")["ok"]
    _running(daemon, "vol2")
    del daemon.detail["/dev/md/vol2"]["MD_NAME"]
    assert storage.md_stop("vol2")["ok"]
    assert [a[1] for a in daemon.acted()] == ["--stop", "--stop"]


def test_daemon_an_unnamed_array_is_ours_only_with_the_marker_and_through_its_link(daemon):
    _running(daemon, "vol1", uuid="11111111:22222222:33333333:44444444")
    del daemon.detail["/dev/md/vol1"]["MD_NAME"]       # unmarked and nameless: not ours
    assert "not an array this library made" in storage.md_stop("vol1")["error"]
    assert storage.ownership({"MD_UUID": MARKED}, "vol1") is None    # not via the link
    assert daemon.acted() == []


def test_daemon_grow_refuses_a_degraded_array(daemon):
    """md would keep the absent leg out for good: it re-adds no leg smaller than the array."""
    _running(daemon, "vol1", members=("/dev/nvme0n1",))
    md = os.path.join(host.SYS, "block/md127/md")
    os.makedirs(md)
    with open(os.path.join(md, "degraded"), "w") as f:
        f.write("1\n")
    result = storage.md_grow("vol1")
    assert not result["ok"] and "degraded" in result["error"] and daemon.acted() == []
    with open(os.path.join(md, "degraded"), "w") as f:
        f.write("0\n")
    assert storage.md_grow("vol1")["ok"]
    assert [a[1] for a in daemon.acted()] == ["--grow"]


def test_daemon_assemble_removes_failed_members_only_when_md_lists_one(daemon):
    """``--remove failed`` after an assemble or adoption runs only when a member's state
    says faulty (an mdadm run less on every RAID attach otherwise)."""
    daemon.examine["/dev/nvme0n1"] = _sb_of("vol1")
    daemon.examine["/dev/nvme1n1"] = _sb_of("vol1")
    _running(daemon, "vol1")
    md = os.path.join(host.SYS, "block/md127/md")
    for member, state in (("dev-nvme0n1", "in_sync"), ("dev-nvme1n1", "in_sync")):
        os.makedirs(os.path.join(md, member))
        with open(os.path.join(md, member, "state"), "w") as f:
            f.write(state + "\n")
    with open(os.path.join(md, "array_state"), "w") as f:
        f.write("clean\n")
    assert storage.md_assemble("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"])["ok"]
    assert daemon.acted() == []
    with open(os.path.join(md, "dev-nvme1n1", "state"), "w") as f:
        f.write("faulty,write_error\n")
    storage.md_assemble("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"])
    assert daemon.acted() == [["mdadm", "--manage", "/dev/md/vol1", "--remove", "failed"]]

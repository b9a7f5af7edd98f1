"""Coverage matrix, replicated modes (issue 15 item 6), on the real kernel in the lab VM.

- degraded attach, extend and heal for RAID1 (``volume_replicas``) and dm-multipath
  (``dm_replicas``): a replica's target is down before the attach, the attach succeeds
  degraded and says so, the missing replica is seen (md ``degraded``, the map's path list,
  the path report) before the heal brings it back, and the data written before is intact
  after it.  Extend while degraded: the dm map grows over the replica it has; a degraded md
  array is not grown (md would never re-add the absent leg to it), the extend says why and
  works after the heal;
- dm-multipath over replicas that each have two portals (native multipath per replica): one
  portal of one replica lost under I/O.

What is asserted is read from the kernel (sysfs, ``dmsetup status`` through the root target
agent), not only the connector's own return.
"""

import os
import re

import pytest
from test_gate import (NQN, STALL_LIMIT, U1, U2, UTOP, controllers, portal, replicas,
                       stall_under_failure)

from nvmeof_mp.exception import ReplicaError
from nvmeof_mp.lab.workload import verify, wait_for, write_for

pytestmark = pytest.mark.usefixtures("no_leftovers")

MIB = 1024 * 1024
NQA, NQB = NQN + "-a", NQN + "-b"


def block_name(path):
    """md127, dm-3: the kernel's name of a /dev/md/X or /dev/mapper/X link."""
    return os.path.basename(os.path.realpath(path))


def sysfs(name, attr):
    with open("/sys/block/%s/%s" % (name, attr)) as f:
        return f.read().strip()


def size_bytes(path):
    return int(sysfs(block_name(path), "size")) * 512


def md_members(path):
    """{leg device name: md state} of the array behind ``path`` (sysfs md/dev-*)."""
    md = block_name(path)
    out = {}
    for entry in os.listdir("/sys/block/%s/md" % md):
        if entry.startswith("dev-"):
            out[entry[4:]] = sysfs(md, "md/%s/state" % entry)
    return out


def dm_slaves(path):
    return sorted(os.listdir("/sys/block/%s/slaves" % block_name(path)))



def grow_both(target, size_mb=96):
    for nqn in (NQA, NQB):
        target.resize_namespace(nqn, 1, size_mb)


def leg_of(result, nqn):
    return next(r for r in result["replicas"] if r["nqn"] == nqn)


def verdicts(connector, info):
    return {r["nqn"]: r["verdict"] for r in connector.get_path_status(info)}


@pytest.mark.cover("degraded attach, extend, heal", mode="raid", transport="tcp")
def test_cover_raid_degraded_attach_extend_heal(connector, target):
    raid = {"volume_replicas": replicas(target), "alias": "covraid"}
    first = connector.connect_volume(raid)
    written = write_for(first["path"])
    connector.disconnect_volume(raid, first)              # both legs carry the superblock
    target.unlink(2, NQB)                                 # replica B's target is down

    result = connector.connect_volume(raid)
    assert result["path"] == "/dev/md/covraid" and result["degraded"], result
    assert leg_of(result, NQB)["device"] is None and leg_of(result, NQB)["error"]
    md = block_name(result["path"])
    assert sysfs(md, "md/degraded") == "1" and sysfs(md, "md/raid_disks") == "2"
    assert len(md_members(result["path"])) == 1, md_members(result["path"])
    assert verdicts(connector, raid) == {NQA: "healthy", NQB: "down"}
    assert verify(result["path"], written) == []

    # extend while degraded: refused with the reason, nothing grown (md would never re-add
    # leg B to an array grown without it: "--re-add ... is not possible")
    before = size_bytes(result["path"])
    grow_both(target)
    with pytest.raises(ReplicaError, match="degraded.*heal"):
        connector.extend_volume(raid)
    assert size_bytes(result["path"]) == before and sysfs(md, "md/degraded") == "1"
    written.update(write_for(result["path"]))            # the array still takes writes

    target.link(2, NQB)
    report = connector.check_paths(raid)
    assert report["healed"] and report["readded"] and not report["degraded"], report
    assert verdicts(connector, raid) == {NQA: "healthy", NQB: "healthy"}
    assert wait_for(lambda: sysfs(md, "md/degraded") == "0", 60), md_members(result["path"])
    assert [s.split(",")[0] for s in md_members(result["path"]).values()] == [
        "in_sync", "in_sync"]
    size = connector.extend_volume(raid)                  # healed: the extend grows it
    assert size > before and size_bytes(result["path"]) == size
    assert verify(result["path"], written) == []
    connector.disconnect_volume(raid, result)
    assert not os.path.exists("/dev/md/covraid") and controllers() == {}


@pytest.mark.cover("degraded attach, extend, heal", mode="dm", transport="tcp")
def test_cover_dm_degraded_attach_extend_heal(connector, target):
    dm = {"vol_uuid": UTOP, "dm_replicas": replicas(target, shared_backing=True)}
    target.unlink(2, NQB)                                 # replica B's target is down

    result = connector.connect_volume(dm)
    assert result["path"] == "/dev/mapper/" + UTOP and result["degraded"], result
    assert leg_of(result, NQB)["device"] is None and leg_of(result, NQB)["error"]
    assert len(dm_slaves(result["path"])) == 1
    assert list(target.dm_status(UTOP).values()) == ["A"]
    assert verdicts(connector, dm) == {NQA: "healthy", NQB: "down"}
    written = write_for(result["path"])

    grow_both(target)                                     # one backing file: both grow
    size = connector.extend_volume(dm)
    assert size == 96 * MIB and size_bytes(result["path"]) == size
    assert len(dm_slaves(result["path"])) == 1            # still one path: seen before the heal
    written.update(write_for(result["path"]))

    target.link(2, NQB)
    report = connector.check_paths(dm)
    assert report["healed"] and not report["degraded"], report
    assert verdicts(connector, dm) == {NQA: "healthy", NQB: "healthy"}
    assert len(dm_slaves(result["path"])) == 2
    states = target.dm_status(UTOP)
    assert sorted(states.values()) == ["A", "A"], states
    assert size_bytes(result["path"]) == size
    assert verify(result["path"], written) == []
    connector.disconnect_volume(dm, result)
    assert not os.path.exists(result["path"]) and controllers() == {}


def two_portal_replicas(target):
    """Replica A on ports 1 and 3, replica B on ports 2 and 4, one backing file (the same
    data behind both, as dm-multipath needs)."""
    layout = ((NQA, U1, ((1, 4420), (3, 4422))), (NQB, U2, ((2, 4421), (4, 4423))))
    backing = None
    out = []
    for nqn, uuid, ports in layout:
        target.add_subsystem(nqn)
        made = target.add_namespace(nqn, 1, 64, uuid, backing=backing)
        backing = backing or made
        for pid, svc in ports:
            target.add_port(pid, svc)
            target.link(pid, nqn)
        out.append({"target_nqn": nqn, "vol_uuid": uuid,
                    "portals": [portal(svc) for _, svc in ports]})
    return out


@pytest.mark.native
@pytest.mark.cover("one portal of a replica lost under I/O", mode="dm-native", transport="tcp")
def test_cover_dm_over_two_portal_replicas_loses_one_portal_under_io(connector, target):
    dm = {"vol_uuid": UTOP, "dm_replicas": two_portal_replicas(target)}
    result = connector.connect_volume(dm)
    assert result["path"] == "/dev/mapper/" + UTOP and not result["degraded"], result
    assert len(controllers()) == 4 and len(dm_slaves(result["path"])) == 2
    # each dm path is a native multipath head nvmeXnY over two path devices nvmeXcYnY
    for leg in result["replicas"]:
        subsys, nsid = re.fullmatch(r"/dev/nvme(\d+)n(\d+)", leg["device"]).groups()
        paths = [d for d in os.listdir("/sys/class/block")
                 if re.fullmatch(r"nvme%sc\d+n%s" % (subsys, nsid), d)]
        assert len(paths) == 2, (leg, paths)

    seen = {}

    def lose():
        target.unlink(1, NQA)
        seen["during"] = wait_for(lambda: sorted(controllers().values()) == [
            "connecting", "live", "live", "live"], 10)
        seen["map"] = target.dm_status(UTOP)
    w = stall_under_failure(result["path"], lose, lambda: target.link(1, NQA))
    assert seen["during"], "the lost portal's controller was not seen reconnecting"
    # the replica kept a live portal: dm never failed its path
    assert sorted(seen["map"].values()) == ["A", "A"], seen["map"]
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    assert all(r["verdict"] == "healthy" for r in connector.get_path_status(dm))
    connector.disconnect_volume(dm, result)
    assert not os.path.exists(result["path"]) and controllers() == {}

"""RAID1 data safety against the real kernel and mdadm (issue 13, items 3, 7 and 8): no
sequence of attach, heal and detach overwrites a leg holding the volume's data."""

import os
import subprocess
import time

import pytest

from nvmeof_mp.exception import ReplicaError
from nvmeof_mp.lab.workload import verify, wait_for, write_for

from test_gate import NQN, U1, U2, controllers, md_degraded, record, replicas

pytestmark = pytest.mark.usefixtures("no_leftovers")
NQB = NQN + "-b"


@pytest.fixture(scope="module")
def connector():
    """A finite ctrl_loss_tmo: the base's default -1 is refused by the daemon's option
    string check ("starts with '-'"), a defect of its own, reported separately."""
    from nvmeof_mp.connector import NVMeOFConnector
    from nvmeof_mp.policy import TimeoutPolicy
    return NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                           use_multipath=True, policy=TimeoutPolicy(ctrl_loss_tmo=600))



def superblock(leg):
    """(array UUID bytes, name) of a leg's md 1.2 superblock, read as the lab user (mdadm
    --examine wants root): it sits 4 KiB into the leg, set_uuid at 16, set_name at 32."""
    with open(leg, "rb") as f:
        f.seek(4096)
        sb = f.read(64)
    assert sb[:4] == b"\xfc\x4e\x2b\xa9", "no md superblock on %s" % leg
    return sb[16:32], sb[32:64].rstrip(b"\0").decode()


def sb_state(leg):
    """(events, this leg's role, the roles its superblock records active) of a 1.2 superblock,
    read as the lab user: events at 200, dev_number at 160, max_dev at 220, dev_roles
    (16-bit each: 0xffff spare, 0xfffe faulty) from 256."""
    import mmap
    import struct
    sb = mmap.mmap(-1, 4096)            # O_DIRECT: md writes past the leg's page cache
    fd = os.open(leg, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [sb], 4096)
    finally:
        os.close(fd)
    events, = struct.unpack_from("<Q", sb, 200)
    number, = struct.unpack_from("<I", sb, 160)
    max_dev, = struct.unpack_from("<I", sb, 220)
    roles = struct.unpack_from("<%dH" % min(max_dev, 384), sb, 256)
    return events, roles[number], [r for r in roles if r < 0xff00]


@pytest.mark.cover("no resync over the data: blank replacement leg", mode="raid")
def test_raid_safety_data_leg_absent_with_a_blank_replacement(connector, target):
    """The leg holding the data is away and the other replica was re-made blank: refused
    (never an empty array); when the data leg returns it is assembled and the blank leg
    added and resynced from it; the data written before is there."""
    raid = {"volume_replicas": replicas(target), "alias": "safevol", "replica_count": 2}
    first = connector.connect_volume(raid)
    uuid, name = superblock(first["replicas"][0]["device"])
    assert uuid[:8] == b"nvmeofmp" and name.rsplit(":", 1)[-1] == "safevol"   # the marker
    written = write_for(first["path"])
    connector.disconnect_volume(raid, first)
    target.remove_namespace(NQB, 1)                       # replica B re-made: blank
    target.add_namespace(NQB, 1, 64, U2)
    target.unlink(1, NQN + "-a")                          # the data leg is away
    with pytest.raises(ReplicaError, match="1 of 2 legs"):
        connector.connect_volume(raid)
    assert not os.path.exists("/dev/md/safevol") and controllers() == {}
    target.link(1, NQN + "-a")
    again = connector.connect_volume(raid)
    assert again["path"] == "/dev/md/safevol"
    assert wait_for(lambda: md_degraded(again["path"]) == 0, 60)
    assert verify(again["path"], written) == []
    connector.disconnect_volume(raid, again)


@pytest.mark.cover("no resync over the data: stale leg returns", mode="raid")
def test_raid_safety_stale_leg_returns_after_writes(connector, target):
    """A leg that missed writes comes back: re-added (bitmap resync), the newer data kept.
    The alias is longer than md allows (KumoScale's volume-<uuid>): a derived md name."""
    from nvmeof_mp.raid import md_name
    raid = {"volume_replicas": replicas(target), "alias": "volume-" + U1}
    result = connector.connect_volume(raid)
    assert result["path"] == "/dev/md/" + md_name("volume-" + U1)
    assert superblock(result["replicas"][1]["device"])[1].rsplit(":", 1)[-1] == \
        md_name("volume-" + U1)
    write_for(result["path"], 0.5)
    target.unlink(2, NQB)
    later = write_for(result["path"])                    # B misses these (failfast)
    assert wait_for(lambda: md_degraded(result["path"]) == 1, 30)
    target.link(2, NQB)
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    connector.check_paths(raid)
    assert wait_for(lambda: md_degraded(result["path"]) == 0, 60)
    assert verify(result["path"], later) == []
    connector.disconnect_volume(raid, result)


@pytest.mark.cover("single replica is the namespace", mode="raid")
def test_raid_safety_kumoscale_single_replica_is_the_namespace(connector, target):
    target.add_subsystem(NQN + "-a")
    target.add_namespace(NQN + "-a", 1, 64, U1)
    target.add_port(1, 4420)
    target.link(1, NQN + "-a")
    info = {"vol_uuid": U1, "alias": "volume-" + U1, "replica_count": 1, "writable": True,
            "volume_replicas": [{"vol_uuid": U1, "target_nqn": NQN + "-a",
                                 "portals": [("127.0.0.1", "4420", "tcp")]}]}
    result = connector.connect_volume(info)
    assert result["path"].startswith("/dev/nvme")
    assert not any(d.startswith("md") for d in os.listdir("/sys/block"))
    assert connector.get_volume_paths(info) == [result["path"]]
    assert verify(result["path"], write_for(result["path"], 0.3)) == []
    connector.disconnect_volume(info, result)
    assert controllers() == {}



@pytest.mark.cover("no resync over the data: leg ahead of the array", mode="raid")
def test_raid_safety_leg_ahead_of_the_array_is_left_out(connector, target):
    """Split history: B took writes while A was away, then A was assembled alone and took
    others.  When B returns it holds writes the running array lacks: md would take it back,
    so the library leaves it out, reports it, and nothing adds it over.  Judged from B's own
    superblock (it recorded A missing), not from event counts, which on 6.12 may show B
    behind."""
    raid = {"volume_replicas": replicas(target), "alias": "safevol3"}
    first = connector.connect_volume(raid)
    write_for(first["path"], 0.3)
    target.unlink(1, NQN + "-a")                          # A away, B takes writes
    write_for(first["path"])
    assert wait_for(lambda: md_degraded(first["path"]) == 1, 30)
    connector.disconnect_volume(raid, first, force=True)
    target.link(1, NQN + "-a")
    target.unlink(2, NQB)                                 # now only the stale A comes
    alone = connector.connect_volume(raid)
    assert alone["degraded"]
    on_a = write_for(alone["path"])
    target.link(2, NQB)
    healed = connector.connect_volume(raid)               # B returns, ahead of the array
    record_b = healed["replicas"][1]
    seen = "%s; A %s; B %s; slaves %s" % (
        healed, sb_state(healed["replicas"][0]["device"]), sb_state(record_b["device"]),
        os.listdir("/sys/block/%s/slaves" % os.path.basename(
            os.path.realpath(healed["path"]))))
    record("split history: B %s" % (
        "left out" if record_b["error"] else "re-added") + "; " + seen.split("; ", 1)[1])
    assert healed["degraded"] and "split history" in (record_b["error"] or ""), seen
    time.sleep(3)
    subprocess.run(["udevadm", "settle", "--timeout=10"], check=False)
    # B's add event ran udev's "mdadm --incremental" during the connect: it did not re-add
    # B to the running array either
    assert md_degraded(healed["path"]) == 1, seen         # B never resynced over
    assert verify(healed["path"], on_a) == []
    connector.disconnect_volume(raid, healed)

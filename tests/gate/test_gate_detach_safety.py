"""Bounded detach and size-aware extend against the real kernel (issue 12, items 5 and 12)."""

import concurrent.futures
import os
import time

import pytest

from nvmeof_mp.exception import NVMeOFError
from nvmeof_mp.lab.workload import native_multipath, wait_for

from test_gate import NQN, UTOP, controllers, info, one_subsystem, record, replicas

pytestmark = pytest.mark.usefixtures("no_leftovers")
FLUSH_TIMEOUT = 3.0


@pytest.fixture
def short_flush():
    from nvmeof_mp.connector import NVMeOFConnector
    from nvmeof_mp.policy import TimeoutPolicy
    # ctrl_loss_tmo -1: a dead path reconnects forever, so its queued I/O never fails by itself
    return NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"], use_multipath=True,
                           policy=TimeoutPolicy(flush_timeout=FLUSH_TIMEOUT, ctrl_loss_tmo=-1))


@pytest.mark.cover("detach with every path dead: bounded", mode="dm")
def test_dm_detach_with_every_path_dead_is_bounded(short_flush, target):
    """Both replicas gone: the flush into the queueing map gives up after flush_timeout and
    the map stays (data kept); a forced detach then stops queueing and removes everything.
    Another volume attaches and detaches meanwhile without waiting for the stuck one."""
    connector = short_flush
    dm = {"vol_uuid": UTOP, "dm_replicas": replicas(target)}
    result = connector.connect_volume(dm)
    other_nqn = NQN + "-other"
    target.add_subsystem(other_nqn)
    target.add_namespace(other_nqn, 1, 16, "00000000-0000-4000-8000-0000000000aa")
    target.add_port(3, 4422)
    target.link(3, other_nqn)
    target.unlink(1, NQN + "-a")
    target.unlink(2, NQN + "-b")
    assert wait_for(lambda: "live" not in controllers().values(), 20)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        stuck = pool.submit(connector.disconnect_volume, dm, result)
        time.sleep(0.5)                     # the detach is in its flush now
        o = time.monotonic()
        other = connector.connect_volume(info("00000000-0000-4000-8000-0000000000aa",
                                              other_nqn, ports=(4422,)))
        connector.disconnect_volume(info("00000000-0000-4000-8000-0000000000aa", other_nqn,
                                         ports=(4422,)), other)
        other_took = time.monotonic() - o
        with pytest.raises(NVMeOFError, match="no answer|no active path"):
            stuck.result(timeout=FLUSH_TIMEOUT + 30)
        failed_after = time.monotonic() - t
    assert failed_after < FLUSH_TIMEOUT + 10
    assert os.path.exists(result["path"])               # not forced: the map is kept
    t = time.monotonic()
    connector.disconnect_volume(dm, result, force=True, ignore_errors=True)
    forced = time.monotonic() - t
    record("dm detach, every path dead: fails after %.2fs (flush_timeout %.0fs), forced "
           "detach %.2fs, another volume's attach+detach meanwhile %.2fs"
           % (failed_after, FLUSH_TIMEOUT, forced, other_took))
    assert forced < 20
    assert not os.path.exists(result["path"]) and controllers() == {}


@pytest.mark.cover("detach with every path dead: bounded", mode="native")
def test_nvme_detach_with_every_path_dead_fails_fast_or_forces(short_flush, target):
    """Native multipath (both portals) or, with multipath off, the one connected portal."""
    connector = short_flush
    one_subsystem(target)
    result = connector.connect_volume(info())
    target.unlink(1, NQN)
    target.unlink(2, NQN)
    assert wait_for(lambda: "live" not in controllers().values(), 20)
    t = time.monotonic()
    with pytest.raises(NVMeOFError, match="no live path"):
        connector.disconnect_volume(info(), result)
    refused = time.monotonic() - t
    assert len(controllers()) == (2 if native_multipath() else 1)
    t = time.monotonic()
    connector.disconnect_volume(info(), result, force=True, ignore_errors=True)
    forced = time.monotonic() - t
    record("nvme detach, every path dead: refused in %.3fs, forced in %.3fs"
           % (refused, forced))
    assert refused < 2 and forced < 10 and controllers() == {}


@pytest.mark.cover("extend (512 and 4096 byte blocks)")
@pytest.mark.parametrize("lba", [512, 4096])
def test_extend_knows_the_target_size_and_does_not_wait(connector, target, lba):
    one_subsystem(target, lba=lba, ports=((1, 4420),))
    result = connector.connect_volume(info(ports=(4420,)))
    device = result["path"]
    assert connector.kernel.namespace_size(device) == 64 * 1024 * 1024
    target.resize_namespace(NQN, 1, 96)
    name = os.path.basename(device)

    def sysfs_size():
        with open("/sys/class/block/%s/size" % name) as f:
            return int(f.read()) * 512
    wait_for(lambda: sysfs_size() == 96 * 1024 * 1024, 10)   # the AEN's rescan, usually
    t = time.monotonic()
    assert connector.extend_volume(info(ports=(4420,))) == 96 * 1024 * 1024
    took = time.monotonic() - t
    assert connector.kernel.namespace_size(device) == 96 * 1024 * 1024
    record("extend (lba %d) after the kernel saw the new size: %.3fs" % (lba, took))
    assert took < 2
    connector.disconnect_volume(info(ports=(4420,)), result)


@pytest.mark.cover("extend (512 and 4096 byte blocks)", mode="raid")
def test_raid_extend_grows_both_legs_together(connector, target):
    raid = {"volume_replicas": replicas(target), "alias": "gatext"}
    result = connector.connect_volume(raid)
    for nqn in (NQN + "-a", NQN + "-b"):
        target.resize_namespace(nqn, 1, 96)
    t = time.monotonic()
    size = connector.extend_volume(raid)
    record("RAID extend of two legs: %.3fs" % (time.monotonic() - t))
    assert size > 64 * 1024 * 1024

    def sectors(device):
        name = os.path.basename(os.path.realpath(device))
        with open("/sys/class/block/%s/size" % name) as f:
            return int(f.read())
    # what the host shows: both legs at the new size, the array grown to what was returned
    assert [sectors(r["device"]) * 512 for r in result["replicas"]] == [96 * 1024 * 1024] * 2
    assert sectors(result["path"]) * 512 == size
    # detach at once, while md resyncs the grown part and udev still handles the legs'
    # resize events: the detach lets udev finish first, or its mdadm --incremental of a freed
    # leg would start an array of its own (left behind, see replicas.udev_idle)
    connector.disconnect_volume(raid, result)

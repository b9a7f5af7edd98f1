"""The connector against the real kernel, in every mode (runs in the lab VM)."""

import concurrent.futures
import os
import time

import pytest
from conftest import kernel_version

from nvmeof_mp.lab.workload import Writer, native_multipath, verify, wait_for

NQN = "nqn.2014-08.org.nvmeof-mp:gate"
U1 = "8d2f4f9a-1b7e-4c2a-9a55-3f1e6c2b7d01"
U2 = "0b7b1c2d-3e4f-4a5b-8c6d-7e8f90a1b2c3"
UTOP = "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11"
#: The longest I/O stall allowed when a path or replica leg is lost under I/O: failover within
#: leg_fast_io_fail_tmo (1 s) plus slack for the emulated VM.  Before Linux 5.11 (no
#: fast_io_fail_tmo) a leg fails when the kernel gives its controller up, after the legs'
#: ctrl_loss_tmo of 2 s (doc/source/timeouts.rst): 2 s more.
STALL_LIMIT = 2.0 if kernel_version() >= (5, 11) else 4.0

pytestmark = pytest.mark.usefixtures("no_leftovers")


def portal(port):
    return ["127.0.0.1", str(port), "tcp"]


def one_subsystem(target, nqn=NQN, ports=((1, 4420), (2, 4421)), namespaces=((1, U1),),
                  size_mb=64, backing=None, lba=4096, ana=False):
    """A subsystem on ``ports``; with ``ana`` port 1 is optimized and port 2 non-optimized."""
    target.add_subsystem(nqn)
    for nsid, uuid in namespaces:
        target.add_namespace(nqn, nsid, size_mb, uuid, ana_group=1, backing=backing, lba=lba)
    for pid, svc in ports:
        if str(pid) not in target.state()["ports"]:
            target.add_port(pid, svc)
        target.link(pid, nqn)
    if ana:
        target.set_ana_state(1, 1, "optimized")
        target.set_ana_state(2, 1, "non-optimized")


def info(uuid=U1, nqn=NQN, ports=(4420, 4421)):
    return {"vol_uuid": uuid, "target_nqn": nqn, "portals": [portal(p) for p in ports]}


def controllers():
    out = {}
    for name in os.listdir("/sys/class/nvme"):
        with open("/sys/class/nvme/%s/state" % name) as f:
            out[name] = f.read().strip()
    return out


def healthy_report(connector, vol, timeout=10):
    """The volume's path report once every portal's path is there and usable.

    An attach waits for one usable path, not for the kernel's namespace scan on every
    controller: right after it, a live controller's path may still be on its way."""
    seen = {}

    def healthy():
        seen["report"] = connector.get_path_status(vol)[0]
        return seen["report"]["verdict"] == "healthy"

    assert wait_for(healthy, timeout), seen.get("report")
    return seen["report"]


def stall_under_failure(device, fail, restore, down_for=4.0):
    """Write patterns while ``fail()`` .. ``restore()`` happen; verify; return the writer."""
    w = Writer(device)
    w.start()
    time.sleep(1.0)
    fail()
    time.sleep(down_for)
    restore()
    time.sleep(2.0)
    w.stop()
    assert not w.errors, w.errors[:5]
    assert w.ops > 0
    assert verify(device, w.expected) == []
    record("%s: longest I/O stall %.3fs over %d writes, %d blocks verified"
           % (os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], w.max_stall, w.ops,
              len(w.expected)))
    return w


def record(line):
    """Measurements go to the lab's result share, printed by ``nvmeof-mp lab gate``."""
    out = os.environ.get("NVMEOF_MP_LAB_OUT")
    if out:
        with open(os.path.join(out, "gate-metrics.txt"), "a") as f:
            f.write("kernel=%s multipath=%s %s\n" % (
                os.uname().release, "Y" if native_multipath() else "N", line))


def booted_multipath():
    """The nvme_core multipath setting the lab asked for (its modprobe.d file, written before
    the module loaded): a source independent of the sysfs parameter the connector reads, so
    the properties test fails if the kernel did not take the setting or the connector
    misreads it."""
    with open("/etc/modprobe.d/nvmeof-lab.conf") as f:
        words = f.read().split()
    values = [w.split("=", 1)[1] for w in words if w.startswith("multipath=")]
    assert values, "the lab gate sets nvme_core multipath=Y or N"
    return values[-1] in ("Y", "y", "1")


@pytest.mark.cover("connector properties (nvme_native_multipath, host NQN and ID)")
def test_properties(connector):
    from nvmeof_mp.connector import NVMeOFConnector
    props = NVMeOFConnector.get_connector_properties(os.environ["NVMEOF_MP_ROOT_HELPER"])
    assert props["nvme_native_multipath"] is booted_multipath()
    assert props["nqn"].startswith("nqn.2014-08.org.nvmexpress:uuid:")
    assert props["nvme_hostid"]


@pytest.mark.cover("attach, I/O, detach")
@pytest.mark.root_too
def test_single_path(connector, target):
    one_subsystem(target, ports=((1, 4420),))
    result = connector.connect_volume(info(ports=(4420,)))
    assert result["path"].startswith("/dev/nvme") and os.path.exists(result["path"])
    # as the lab user, wait_for_udev=auto must have waited until udev let group disk in
    assert os.access(result["path"], os.R_OK | os.W_OK)
    w = Writer(result["path"])
    w.start()
    time.sleep(0.5)
    w.stop()
    assert not w.errors and w.ops > 0, w.errors[:5]     # else nothing below is checked
    assert verify(result["path"], w.expected) == []
    connector.disconnect_volume(info(ports=(4420,)), result)
    assert controllers() == {}


@pytest.mark.cover("attach, I/O, detach", mode="native")
@pytest.mark.native
@pytest.mark.root_too
def test_native_multipath_two_portals(connector, target):
    one_subsystem(target, ana=True)
    result = connector.connect_volume(info())
    assert {p["state"] for p in result["paths"]} == {"live"}
    assert "optimized" in [p["ana_state"] for p in result["paths"]]
    # the non-optimized path shows up as the kernel scans it (the attach need not wait)
    assert wait_for(lambda: sorted(p["ana_state"] for p in connector.get_path_status(info())[0]
                                   ["paths"]) == ["non-optimized", "optimized"], 10)
    assert connector.get_volume_paths(info()) == [result["path"]]
    connector.disconnect_volume(info(), result)


@pytest.mark.cover("attach with a portal down")
def test_single_path_request_with_first_portal_down(connector, target):
    from nvmeof_mp.connector import NVMeOFConnector
    one_subsystem(target, ports=((2, 4421),))
    target.add_port(1, 4420)            # listening port without the subsystem: refused
    single = NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                             use_multipath=False)
    result = single.connect_volume(info())
    assert list(controllers().values()) == ["live"]
    single.disconnect_volume(info(), result)


@pytest.mark.cover("path lost under I/O", mode="native")
@pytest.mark.native
def test_native_path_failure_during_io(connector, target):
    one_subsystem(target)
    result = connector.connect_volume(info())
    w = stall_under_failure(result["path"], lambda: target.unlink(1, NQN),
                            lambda: target.link(1, NQN))
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 20)
    connector.disconnect_volume(info(), result)


@pytest.mark.cover("degraded attach, then heal", mode="native")
@pytest.mark.native
def test_degraded_attach_then_heal(connector, target):
    one_subsystem(target, ports=((1, 4420),))
    target.add_port(2, 4421)
    result = connector.connect_volume(info())
    assert result["degraded"] and result["failed_portals"] == ["tcp://127.0.0.1:4421"]
    target.link(2, NQN)
    healed = connector.connect_volume(info())          # attach again = heal missing portals
    assert not healed["degraded"] and len(controllers()) == 2
    connector.disconnect_volume(info(), healed)


@pytest.mark.cover("shared subsystem: detach keeps the other volume", mode="native")
@pytest.mark.native
def test_detach_leaves_other_volume_on_subsystem(connector, target):
    one_subsystem(target, namespaces=((1, U1), (2, U2)))
    a = connector.connect_volume(info(U1))
    b = connector.connect_volume(info(U2))
    assert a["path"] != b["path"]
    connector.disconnect_volume(info(U1), a)
    assert len(controllers()) == 2 and os.path.exists(b["path"])
    # Cinder unmaps the detached volume; the kernel drops its namespace (AEN)
    target.remove_namespace(NQN, 1)
    assert wait_for(lambda: not os.path.exists(a["path"]), 20)
    w = Writer(b["path"])
    w.start()
    time.sleep(0.3)
    w.stop()
    assert not w.errors and w.ops > 0, w.errors[:5]
    assert verify(b["path"], w.expected) == []
    connector.disconnect_volume(info(U2), b)


@pytest.mark.cover("extend (512 and 4096 byte blocks)", mode="native")
@pytest.mark.native
@pytest.mark.parametrize("lba", [512, 4096])
def test_extend(connector, target, lba):
    one_subsystem(target, lba=lba)
    result = connector.connect_volume(info())
    name = os.path.basename(result["path"])
    with open("/sys/block/%s/queue/logical_block_size" % name) as f:
        assert int(f.read()) == lba
    target.resize_namespace(NQN, 1, 96)
    assert connector.extend_volume(info()) == 96 * 1024 * 1024
    with open("/sys/block/%s/size" % name) as f:         # the host's device, not the answer
        assert int(f.read()) * 512 == 96 * 1024 * 1024
    connector.disconnect_volume(info(), result)


@pytest.mark.cover("ANA transition under I/O", mode="native")
@pytest.mark.native
def test_ana_transition_during_io(connector, target):
    one_subsystem(target, ana=True)
    result = connector.connect_volume(info())

    def ana_of(port):
        report = connector.get_path_status(info())[0]
        return next(p["ana_state"] for p in report["paths"] if p["portal"].endswith(port))
    w = stall_under_failure(result["path"], lambda: target.set_ana_state(1, 1, "inaccessible"),
                            lambda: target.set_ana_state(1, 1, "optimized"), down_for=3)
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: ana_of("4420") == "optimized", 10)
    target.set_ana_state(1, 1, "inaccessible")
    assert wait_for(lambda: ana_of("4420") == "inaccessible", 10)
    assert connector.get_path_status(info())[0]["verdict"] == "degraded"
    connector.disconnect_volume(info(), result)


@pytest.mark.cover("heal after the kernel deleted a controller", mode="native")
@pytest.mark.native
def test_heal_after_the_kernel_deleted_a_controller(target):
    from nvmeof_mp.connector import NVMeOFConnector
    from nvmeof_mp.policy import TimeoutPolicy
    short = NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"], use_multipath=True,
                            policy=TimeoutPolicy(ctrl_loss_tmo=3, reconnect_delay=1))
    one_subsystem(target)
    result = short.connect_volume(info())
    target.unlink(1, NQN)
    assert wait_for(lambda: len(controllers()) == 1, 30)       # ctrl_loss_tmo expired
    target.link(1, NQN)
    time.sleep(2)
    assert len(controllers()) == 1                             # the kernel will not come back
    report = short.check_paths(info())
    assert report["healed"] and report["after"][0]["verdict"] == "healthy"
    assert len(controllers()) == 2
    short.disconnect_volume(info(), result)


def replicas(target, shared_backing=False):
    a, b = NQN + "-a", NQN + "-b"
    backing = None
    for n, (nqn, uuid, pid, svc) in enumerate(((a, U1, 1, 4420), (b, U2, 2, 4421))):
        target.add_subsystem(nqn)
        path = target.add_namespace(nqn, 1, 64, uuid, backing=backing)
        if shared_backing and n == 0:
            backing = path
        target.add_port(pid, svc)
        target.link(pid, nqn)
    return [{"target_nqn": a, "vol_uuid": U1, "portals": [portal(4420)]},
            {"target_nqn": b, "vol_uuid": U2, "portals": [portal(4421)]}]


def md_degraded(path):
    md = os.path.basename(os.path.realpath(path))
    with open("/sys/block/%s/md/degraded" % md) as f:
        return int(f.read())


@pytest.mark.cover("path lost under I/O, then heal", mode="raid")
def test_raid1_with_leg_failure_during_io(connector, target):
    reps = replicas(target)
    raid = {"volume_replicas": reps, "alias": "gatevol"}
    result = connector.connect_volume(raid)
    assert result["path"] == "/dev/md/gatevol" and not result["degraded"]
    w = stall_under_failure(result["path"], lambda: target.unlink(2, NQN + "-b"),
                            lambda: target.link(2, NQN + "-b"))
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 20)
    # md keeps the failed leg out once its path is back: without that the heal proves nothing
    assert md_degraded(result["path"]) == 1, "the leg never failed"
    connector.check_paths(raid)                          # heal: re-add the returning leg
    assert wait_for(lambda: md_degraded(result["path"]) == 0, 30)
    connector.disconnect_volume(raid, result)
    assert not os.path.exists("/dev/md/gatevol")


def dm_case(connector, target, reps=None):
    """dm-multipath over two replicas (``reps``, default two TCP replicas on one backing
    file): the first replica's path lost under I/O, healed, detached."""
    reps = reps or replicas(target, shared_backing=True)
    dm = {"vol_uuid": UTOP, "dm_replicas": reps}
    result = connector.connect_volume(dm)
    assert result["path"] == "/dev/mapper/" + UTOP and not result["degraded"]
    w = stall_under_failure(result["path"], lambda: target.unlink(1, NQN + "-a"),
                            lambda: target.link(1, NQN + "-a"))
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    # dm keeps the failed path failed once it is back (no multipathd here to reinstate it):
    # without that the heal proves nothing
    failed = connector.kernel.dm_status(UTOP)
    assert "F" in failed.values(), failed
    connector.check_paths(dm)                            # heal: reinstate the failed path
    status = connector.kernel.dm_status(UTOP)
    assert set(status.values()) == {"A"}, status
    connector.disconnect_volume(dm, result)
    assert not os.path.exists(result["path"])


@pytest.mark.cover("path lost under I/O, then heal", mode="dm")
@pytest.mark.no_native
@pytest.mark.root_too
def test_dm_multipath_over_replicas(connector, target):
    dm_case(connector, target)


@pytest.mark.cover("path lost under I/O, then heal", mode="dm-native")
@pytest.mark.native
def test_dm_multipath_over_native_multipath_replicas(connector, target):
    dm_case(connector, target)


@pytest.mark.cover("8 volumes attached and detached at once", mode="native")
def test_concurrent_attach_detach_of_8_volumes(connector, target):
    n = 8
    target.add_port(1, 4420)
    target.add_port(2, 4421)
    infos = []
    for i in range(n):
        nqn = "%s-c%d" % (NQN, i)
        uuid = "00000000-0000-4000-8000-%012d" % (i + 1)
        target.add_subsystem(nqn)
        target.add_namespace(nqn, 1, 16, uuid)
        target.link(1, nqn)
        target.link(2, nqn)
        infos.append(info(uuid, nqn))
    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(connector.connect_volume, infos))
    attach = time.monotonic() - t
    assert len({r["path"] for r in results}) == n
    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: connector.disconnect_volume(i, None), infos))
    record("8 volumes x 2 portals concurrently: attach %.2fs, detach %.2fs"
           % (attach, time.monotonic() - t))
    assert controllers() == {}


@pytest.mark.cover("re-attach assembles from the legs' superblocks", mode="raid")
def test_raid1_reattach_assembles_from_superblocks(connector, target):
    """Second attach: the legs carry superblocks and udev's incremental assembly may have
    grabbed them before us; the array must come up either way, with both legs."""
    raid = {"volume_replicas": replicas(target), "alias": "gatevol2"}
    first = connector.connect_volume(raid)
    connector.disconnect_volume(raid, first)
    assert not os.path.exists("/dev/md/gatevol2")
    for _ in range(2):
        again = connector.connect_volume(raid)
        assert again["path"] == "/dev/md/gatevol2" and not again["degraded"]
        path = again["path"]
        assert wait_for(lambda p=path: md_degraded(p) == 0, 30)
        connector.disconnect_volume(raid, again)

"""multipathd running alongside, in every mode: it must leave our devices and maps alone.

Configurations (CONFIGS): Debian's default (no /etc/multipath.conf), ``find_multipaths
greedy`` (every disk not blacklisted is a multipath candidate), and greedy with the project's
drop-in (etc/multipath/conf.d/nvmeof-mp.conf, which blacklists NVMe over TCP and RDMA).
While multipathd runs, the volumes of every mode the VM is the usual case for are attached
together and written: multipathd must not build a map (``show maps``), must not mark a device
of ours as a multipath path (udev's ``DM_MULTIPATH_DEVICE_PATH=1``, which hides it from
everything else), and our own dm map (dm uuid prefix ``nvmeof_mp-``) must keep all its paths
active.  With native multipath off, greedy and no drop-in, multipathd does take our
namespaces: then every attach must fail with ``ForeignClaim`` and leave nothing behind.
One multipathd start per configuration (tests are grouped by it); doc/source/faults.rst.
"""

import os
import time

import pytest

from conftest import root_helper
from nvmeof_mp.lab.workload import Writer, verify, wait_for
from test_gate import NQN, controllers, info, one_subsystem, portal, record

pytestmark = pytest.mark.usefixtures("no_leftovers")

UTOP = "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11"
#: namespace uuids of the replicas (the kernel refuses one uuid in two subsystems)
UA, UB = "5f0e7d1c-2b3a-4958-8776-a5b4c3d2e1f0", "6a1b2c3d-4e5f-4a6b-9c7d-8e9fa0b1c2d3"
UC, UD = "7b2c3d4e-5f60-4b7c-8d9e-0fa1b2c3d4e5", "8c3d4e5f-6071-4c8d-9eaf-10b2c3d4e5f6"
#: how long multipathd gets to react to the new devices (it acts on their uevents)
WATCH = 3.0


#: the configurations: (find_multipaths greedy, the project's drop-in installed)
CONFIGS = {"default": (False, False), "greedy": (True, False), "greedy+drop-in": (True, True)}
SCENARIO = {"default": "multipathd (default config) running",
            "greedy": "multipathd find_multipaths greedy",
            "greedy+drop-in": "multipathd find_multipaths greedy",
            "refused": "multipathd find_multipaths greedy without the drop-in"}


@pytest.fixture(scope="module")
def multipathd(request):
    """multipathd running in configuration ``request.param`` (CONFIGS), one start per
    configuration for the module (tests are grouped by it)."""
    from nvmeof_mp.lab.agent import TargetClient
    agent = TargetClient()
    t = time.monotonic()
    version = agent.start_multipathd(*CONFIGS[request.param])
    record("multipathd %s (%s) up in %.1fs" % (request.param, version, time.monotonic() - t))
    yield request.param
    agent.stop_multipathd()


def configs(names, modes, scenario=None):
    """Indirect parameters of ``multipathd``, each with the coverage cells it proves."""
    return pytest.mark.parametrize("multipathd", [pytest.param(n, id=n, marks=[
        pytest.mark.cover(scenario or SCENARIO[n], mode=m) for m in modes]) for n in names],
        indirect=True)


def our_block_devices():
    """nvme namespaces (and heads) now present: name -> "major:minor".  The hidden per-path
    nodes of native multipath (nvmeXcYnZ) have no device number and are skipped."""
    out = {}
    for name in os.listdir("/sys/block"):
        if name.startswith("nvme"):
            try:
                with open("/sys/block/%s/dev" % name) as f:
                    out[name] = f.read().strip()
            except FileNotFoundError:
                pass
    return out


def multipath_claims(target):
    """What multipathd did to us: its maps, foreign dm maps over our devices, our devices it
    marked as multipath paths."""
    found = []
    # multipath-tools 0.9.4 answers "ok" when it has no map
    maps = [line for line in target.multipathd_show("maps").splitlines()
            if line.strip() not in ("", "ok") and not line.startswith("name")]
    found += ["map: " + line for line in maps]
    devs = our_block_devices()
    for name, dm in target.dm_tables().items():
        if dm["uuid"].startswith("nvmeof_mp-"):
            continue
        if any(majmin in dm["table"] for majmin in devs.values()):
            found.append("foreign dm map %s (%s) over our devices: %s"
                         % (name, dm["uuid"], dm["table"]))
    for name, majmin in devs.items():
        try:
            with open("/run/udev/data/b%s" % majmin) as f:
                if "E:DM_MULTIPATH_DEVICE_PATH=1" in f.read():
                    found.append("udev: %s marked DM_MULTIPATH_DEVICE_PATH=1" % name)
        except OSError:
            pass
    return found


def exercise(target, devices):
    """Write every device while multipathd has WATCH seconds to claim something; returns
    what it claimed."""
    writers = [Writer(d) for d in devices]
    for w in writers:
        w.start()
    claimed = wait_for(lambda: multipath_claims(target), WATCH)
    for w, device in zip(writers, devices, strict=True):
        w.stop()
        assert not w.errors, w.errors[:5]
        assert w.ops > 0
        assert verify(device, w.expected) == []
    return claimed


def check(mode, multipathd, claimed):
    record("multipathd %s, modes %s: %s" % (multipathd, mode, claimed or "nothing claimed"))
    assert claimed == []


def raid_volume(target):
    return {"volume_replicas": replica_pair(target, "-r", (UA, UB), shared_backing=False),
            "alias": "mpdvol"}


def dm_volume(target):
    return {"vol_uuid": UTOP,
            "dm_replicas": replica_pair(target, "-d", (UC, UD), shared_backing=True)}


def replica_pair(target, suffix, uuids, shared_backing):
    """Two one-portal replicas on ports 1 (4420) and 2 (4421) of subsystems NQN<suffix>a/b;
    the ports exist (``one_subsystem``)."""
    backing, out = None, []
    for n, (uuid, pid, svc) in enumerate(((uuids[0], 1, 4420), (uuids[1], 2, 4421))):
        nqn = NQN + suffix + "ab"[n]
        target.add_subsystem(nqn)
        path = target.add_namespace(nqn, 1, 64, uuid, ana_group=1, backing=backing)
        if shared_backing and n == 0:
            backing = path
        target.link(pid, nqn)
        out.append({"target_nqn": nqn, "vol_uuid": uuid, "portals": [portal(svc)]})
    return out


def assert_our_map_active(connector):
    status = connector.kernel.dm_status(UTOP)
    assert status and set(status.values()) == {"A"}, status     # multipathd left it alone


@pytest.mark.native
@configs(("default", "greedy"), ("native", "dm"))
def test_native_and_dm_left_alone(connector, target, multipathd):
    """Native multipath on: multipath-tools leaves NVMe devices to the kernel, even greedy."""
    one_subsystem(target, ana=True)
    dm = dm_volume(target)
    vol = connector.connect_volume(info())
    mp = connector.connect_volume(dm)
    claimed = exercise(target, [vol["path"], mp["path"]])
    assert_our_map_active(connector)
    connector.disconnect_volume(dm, mp)
    connector.disconnect_volume(info(), vol)
    check("native, dm", multipathd, claimed)


@pytest.mark.no_native
@configs(("default", "greedy+drop-in"), ("single", "raid", "dm"))
def test_single_raid_dm_left_alone(connector, target, multipathd):
    """Native multipath off: Debian's default configuration claims nothing of ours, and a
    greedy one claims nothing once the project's drop-in is installed."""
    from nvmeof_mp.connector import NVMeOFConnector
    single = NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                             use_multipath=False)
    one_subsystem(target)
    raid, dm = raid_volume(target), dm_volume(target)
    vol = single.connect_volume(info())
    md = connector.connect_volume(raid)
    mp = connector.connect_volume(dm)
    claimed = exercise(target, [vol["path"], md["path"], mp["path"]])
    assert_our_map_active(connector)
    connector.disconnect_volume(dm, mp)
    connector.disconnect_volume(raid, md)
    single.disconnect_volume(info(), vol)
    check("single, raid, dm", multipathd, claimed)


@pytest.mark.no_native
@pytest.mark.root_too
@configs(("greedy",), ("single", "raid", "dm"), SCENARIO["refused"])
def test_greedy_without_the_drop_in_is_refused_cleanly(connector, target, multipathd):
    """Native multipath off, greedy multipathd, no drop-in: multipathd takes every new
    namespace, so each attach fails with ForeignClaim naming multipathd's map and the
    drop-in; nothing of the attach is left (multipathd drops its map with the device), and
    nothing was written (no md superblock, no dm map of ours).  Also as root, who can open a
    new node before udev has run multipath-tools' rule on it: the single-path attach must
    wait for udev's verdict all the same."""
    from nvmeof_mp.claims import DROPIN
    from nvmeof_mp.connector import NVMeOFConnector
    from nvmeof_mp.exception import ForeignClaim
    single = NVMeOFConnector(root_helper=root_helper(), use_multipath=False)
    one_subsystem(target)
    attempts = (("single", single, info()), ("raid", connector, raid_volume(target)),
                ("dm", connector, dm_volume(target)))
    for mode, conn, volume in attempts:
        t = time.monotonic()
        with pytest.raises(ForeignClaim) as refused:
            conn.connect_volume(volume)
        took = time.monotonic() - t
        text = str(refused.value)
        record("multipathd greedy without drop-in, mode %s: refused in %.1fs: %s"
               % (mode, took, text))
        assert "mpath" in text and DROPIN in text, text
        assert controllers() == {}, (mode, controllers())
        left = wait_for(lambda: not [d for d in os.listdir("/sys/block")
                                     if d.startswith(("dm-", "md"))], 10)
        assert left, (mode, os.listdir("/sys/block"), target.dm_tables())
        assert multipath_claims(target) == [], mode
        assert connector.attachments() == [], mode

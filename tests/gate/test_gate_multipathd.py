"""multipathd running alongside, in every mode: it must leave our devices and maps alone.

multipathd runs with Debian's default configuration (no /etc/multipath.conf), then with
``find_multipaths greedy`` (every non-blacklisted disk is a multipath candidate).  While it
runs, volumes are attached in every mode and written; multipathd must not build a map (``show
maps``), must not mark a device of ours as a multipath path (udev's
``DM_MULTIPATH_DEVICE_PATH=1``, which hides it from everything else), and our own dm map (dm
uuid prefix ``nvmeof_mp-``) must keep all its paths active.  One multipathd start per
configuration for the module.
"""

import os
import time

import pytest

from nvmeof_mp.lab.workload import Writer, verify, wait_for
from test_gate import controllers, info, one_subsystem, record, replicas

pytestmark = pytest.mark.usefixtures("no_leftovers")

UTOP = "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11"
#: how long multipathd gets to react to the new devices (it acts on their uevents)
WATCH = 3.0


@pytest.fixture(scope="module", params=["default", "greedy"])
def multipathd(request):
    from nvmeof_mp.lab.target import TargetClient
    agent = TargetClient()
    t = time.monotonic()
    version = agent.start_multipathd(request.param == "greedy")
    record("multipathd %s (%s) up in %.1fs" % (request.param, version, time.monotonic() - t))
    yield request.param
    agent.stop_multipathd()


@pytest.fixture(autouse=True)
def known_claims(request, multipathd):
    """Known defect (doc/source/faults.rst): with native multipath off, multipathd under
    ``find_multipaths greedy`` claims our devices.  Kept visible as an xfail until fixed."""
    from nvmeof_mp.lab.workload import native_multipath
    if multipathd == "greedy" and not native_multipath():
        request.applymarker(pytest.mark.xfail(
            reason="greedy multipathd claims NVMe devices with nvme_core.multipath=N",
            strict=False))


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


def exercise(target, device):
    w = Writer(device)
    w.start()
    claimed = wait_for(lambda: multipath_claims(target), WATCH)
    w.stop()
    assert not w.errors, w.errors[:5]
    assert verify(device, w.expected) == []
    return claimed


def check(target, mode, multipathd, claimed):
    record("multipathd %s, mode %s: %s" % (multipathd, mode, claimed or "nothing claimed"))
    assert claimed == []


def test_single_path(target, multipathd):
    from nvmeof_mp.connector import NVMeOFConnector
    single = NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                             use_multipath=False)
    one_subsystem(target)
    result = single.connect_volume(info())
    claimed = exercise(target, result["path"])
    single.disconnect_volume(info(), result)
    check(target, "single", multipathd, claimed)


@pytest.mark.native
def test_native_multipath(connector, target, multipathd):
    one_subsystem(target, ana=True)
    result = connector.connect_volume(info())
    claimed = exercise(target, result["path"])
    connector.disconnect_volume(info(), result)
    check(target, "native", multipathd, claimed)


def test_raid1(connector, target, multipathd):
    raid = {"volume_replicas": replicas(target), "alias": "mpdvol"}
    result = connector.connect_volume(raid)
    claimed = exercise(target, result["path"])
    connector.disconnect_volume(raid, result)
    check(target, "raid1", multipathd, claimed)


def test_dm(connector, target, multipathd):
    dm = {"vol_uuid": UTOP, "dm_replicas": replicas(target, shared_backing=True)}
    result = connector.connect_volume(dm)
    claimed = exercise(target, result["path"])
    status = connector.kernel.dm_status(UTOP)
    connector.disconnect_volume(dm, result)
    check(target, "dm", multipathd, claimed)
    assert set(status.values()) == {"A"}, status        # multipathd left our map alone
    assert controllers() == {}

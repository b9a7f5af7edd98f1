"""The LVM-NVMeoF job: Cinder's own LVM driver and nvmet target helper make the connection
info, Nova's call path attaches it through os-brick's factory (issue 16; see
doc/source/cinder-lvm.rst).

Cinder 29.0.0 runs for real in its own virtualenv, as root, in a worker the root target agent
starts (``nvmeof_mp.lab.cinder_worker``): ``LVMVolumeDriver`` over a volume group on a loop device,
``target_helper = nvmet``, volumes as ``cinder.objects.Volume`` without a database.  This
process is Nova's side: ``InitiatorConnector.factory(NVME, ...)`` as nova 34.0.0's
``LibvirtNVMEVolumeDriver`` builds it (our connector plugged in by ``nvmeof_mp.osbrick``),
``connect_volume(connection_info['data'])``, ``device_path`` added to the data, then
``extend_volume`` and ``disconnect_volume(data, None, force=False)`` with that data.
"""

import json
import os
import socket
import time
import uuid

import pytest
from conftest import root_helper
from test_gate import STALL_LIMIT, controllers, record, stall_under_failure

from nvmeof_mp.lab.workload import Writer, native_multipath, verify

pytestmark = [pytest.mark.cinder, pytest.mark.usefixtures("no_leftovers")]

VG = "cinder-volumes"
#: Cinder's nvmet ports: ``nvmet_port_id`` for the primary address, +1 for the secondary
PORT_ID = 10
TRSVCID = 4430                  # not the lab's 4420/4421
PRIMARY, SECONDARY = "127.0.0.1", "127.0.0.2"
GIB = 1 << 30
#: Cinder options every backend here shares (a cinder.conf backend section)
COMMON = {"volume_group": VG, "lvm_type": "default", "volume_clear": "none",
          "target_helper": "nvmet", "target_port": TRSVCID, "nvmet_port_id": PORT_ID}


def backend_options(version, shared, protocol="nvmet_tcp", address=PRIMARY, secondary=()):
    return dict(COMMON, nvmeof_conn_info_version=version, lvm_share_target=shared,
                target_protocol=protocol, target_ip_address=address,
                target_secondary_ip_addresses=list(secondary),
                # v2 backends name subsystems as devstack does, v1 ones keep Cinder's default
                **({"target_prefix": "nvme-subsystem-1"} if version == 2 else {}))


#: (backend name, options, portals) of the TCP configurations
TCP_BACKENDS = {
    "lvm-v2": (backend_options(2, False, secondary=[SECONDARY]), 2),
    "lvm-v2-shared": (backend_options(2, True, secondary=[SECONDARY]), 2),
    "lvm-v1": (backend_options(1, False), 1),
}
#: the shared v1 backend: volumes on one subsystem in mixed order (the 3-minute budget)
V1_SHARED = ("lvm-v1-shared", backend_options(1, True))


class Cinder:
    """Cinder's side through the root target agent: ``cinder.attach(volume_id=..)``."""

    def __init__(self):
        from nvmeof_mp.lab.agent import TargetClient
        self.client = TargetClient(timeout=280)     # the first call imports Cinder (TCG)

    def __getattr__(self, op):
        return lambda **kwargs: self.client.cinder(op, **kwargs)


@pytest.fixture(scope="module")
def cinder():
    if not os.environ.get("NVMEOF_MP_CINDER_PYTHON"):
        pytest.skip("no Cinder venv (nvmeof-mp lab cinder builds it on the host)")
    c = Cinder()
    t = time.monotonic()
    c.volume_group(name=VG, size_gb=32)
    record("cinder: worker up + volume group in %.1fs" % (time.monotonic() - t))
    return c


@pytest.fixture
def backend(cinder, target):
    """Make a backend on request; after the test: every volume detached and deleted through
    Cinder (after a failure), then nothing of Cinder's on the target."""
    def make(name, options):
        cinder.backend(name=name, options=options)
        return name
    yield make
    left = cinder.forget_all()
    state = cinder.state(vg=VG)
    assert left == [], left
    assert state["lvs"] == [] and state["subsystems"] == {}, state
    # Cinder never removes its nvmet ports; with no subsystem linked they do not listen
    assert all(p["subsystems"] == [] for p in state["ports"].values()), state


@pytest.fixture(scope="module")
def nova():
    """os-brick's connector as Nova's LibvirtNVMEVolumeDriver makes it, and the connector
    properties sent to Cinder (the library's own ``get_connector_properties``)."""
    from os_brick import initiator
    from os_brick.initiator import connector

    from nvmeof_mp import osbrick
    osbrick.register()
    conn = connector.InitiatorConnector.factory(
        initiator.NVME, root_helper(), use_multipath=True, device_scan_attempts=5,
        enforce_multipath=False)
    assert isinstance(conn, osbrick.NVMeOFConnector)
    # the library's own properties: os-brick's generic keys (host, ip, multipath, ..) and its
    # NVMe-oF keys; os-brick's top-level function would also ask its iSCSI, RBD, .. classes
    from nvmeof_mp.connector import NVMeOFConnector
    props = NVMeOFConnector.get_connector_properties(
        root_helper(), multipath=True, enforce_multipath=False, host=socket.gethostname())
    return conn, json.loads(json.dumps(props))


def nova_connection_info(attachment_info):
    """What nova.volume.cinder._translate_attachment_ref makes of the attachment's
    connection_info (the 'data' key put back, attachment_id dropped); JSON in between, as
    over the REST API."""
    data = json.loads(json.dumps(attachment_info))
    data.pop("attachment_id", None)
    return {"driver_volume_type": data.pop("driver_volume_type"), "data": data}


def shapes(info):
    """The data Cinder sent as Nova hands it over (no secrets in LVM's), for the record of
    what the connector is given: key order, values and their types."""
    return {k: "%r" % (v,) for k, v in info["data"].items() if k != "device_path"}


def attach(cinder, nova, volume_id):
    conn, props = nova
    reply = cinder.attach(volume_id=volume_id, connector=props, instance=str(uuid.uuid4()))
    info = nova_connection_info(reply["connection_info"])
    assert info["driver_volume_type"] == "nvmeof"
    t = time.monotonic()
    device = conn.connect_volume(info["data"])
    info["data"]["device_path"] = device["path"]          # as LibvirtNVMEVolumeDriver does
    return info, reply["connection_info"]["attachment_id"], time.monotonic() - t


def detach(cinder, nova, volume_id, info, attachment_id):
    conn, _ = nova
    conn.disconnect_volume(info["data"], None, force=False)
    cinder.detach(volume_id=volume_id, attachment_id=attachment_id)


def write_verify(path, seconds=0.5):
    w = Writer(path)
    w.start()
    time.sleep(seconds)
    w.stop()
    assert not w.errors and w.ops > 0, w.errors[:5]
    assert verify(path, w.expected) == []
    return w


def lifecycle(cinder, nova, target, backend, name, options, portals):
    """Create, export+attach, I/O, path loss (two portals, native multipath), extend through
    Cinder then os-brick, detach, unexport, delete."""
    backend(name, options)
    vol = str(uuid.uuid4())
    cinder.create_volume(backend=name, volume_id=vol, size_gb=1)
    info, attachment_id, took = attach(cinder, nova, vol)
    data = info["data"]
    record("cinder %s: attach %.2fs, data %s" % (name, took, json.dumps(shapes(info))))
    path = data["device_path"]
    assert os.path.exists(path)
    with open("/sys/block/%s/size" % os.path.basename(os.path.realpath(path))) as f:
        assert int(f.read()) * 512 == GIB
    w = write_verify(path)
    if portals == 2 and native_multipath():
        nqn = data.get("target_nqn") or data["nqn"]
        assert len(controllers()) == 2
        w = stall_under_failure(path, lambda: target.unlink(PORT_ID, nqn),
                                lambda: target.link(PORT_ID, nqn))
        assert w.max_stall < STALL_LIMIT
    t = time.monotonic()
    cinder.extend_volume(volume_id=vol, new_size_gb=2)
    assert nova[0].extend_volume(data) == 2 * GIB
    took_extend = time.monotonic() - t
    assert verify(path, w.expected) == []
    t = time.monotonic()
    detach(cinder, nova, vol, info, attachment_id)
    assert controllers() == {}
    cinder.delete_volume(volume_id=vol)
    record("cinder %s: extend %.2fs, detach+unexport+delete %.2fs"
           % (name, took_extend, time.monotonic() - t))


@pytest.mark.root_too
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.cover(
        "Cinder LVM-NVMeoF: life cycle, conn info v%s%s" % (
            o["nvmeof_conn_info_version"], ", shared target" if o["lvm_share_target"] else ""),
        mode="native" if p == 2 else "single", transport="tcp"),
        *([pytest.mark.native] if p == 2 else [])])
    for n, (o, p) in TCP_BACKENDS.items()])
def test_cinder_lvm_nvmet_tcp_lifecycle(cinder, nova, target, backend, name):
    options, portals = TCP_BACKENDS[name]
    lifecycle(cinder, nova, target, backend, name, options, portals)


@pytest.mark.root_too
@pytest.mark.parametrize("version", [
    pytest.param(v, marks=pytest.mark.cover(
        "Cinder LVM-NVMeoF: life cycle, conn info v%d" % v, mode="single", transport="rdma"))
    for v in (2, 1)])
def test_cinder_lvm_nvmet_rdma_lifecycle(cinder, nova, target, backend, version):
    address, why = target.rdma()
    if address is None:
        pytest.skip("no RDMA in this VM: %s" % why)
    name = "lvm-rdma-v%d" % version
    lifecycle(cinder, nova, target, backend, name,
              backend_options(version, False, "nvmet_rdma", address), 1)


@pytest.mark.root_too
@pytest.mark.cover("Cinder LVM-NVMeoF: volumes on a shared target, mixed order, conn info v1",
                   mode="single")
def test_cinder_shared_target_volumes_in_mixed_order(cinder, nova, target, backend):
    """Three volumes in one host's subsystem (one namespace each): attach a, b; detach a;
    attach c; detach b; I/O on c throughout; detach c.  The subsystem goes with the last.
    (Shared with two portals: the ``lvm-v2-shared`` life cycle.)"""
    name, options = V1_SHARED
    backend(name, options)
    vols = [str(uuid.uuid4()) for _ in range(3)]
    for vol in vols:
        cinder.create_volume(backend=name, volume_id=vol, size_gb=1)
    att = {}
    att[vols[0]] = attach(cinder, nova, vols[0])
    att[vols[1]] = attach(cinder, nova, vols[1])
    nqns = {(i[0]["data"].get("target_nqn") or i[0]["data"]["nqn"]) for i in att.values()}
    assert len(nqns) == 1, nqns                       # one subsystem per host
    paths = {v: a[0]["data"]["device_path"] for v, a in att.items()}
    assert len(set(paths.values())) == 2
    written = {v: write_verify(p) for v, p in paths.items()}
    detach(cinder, nova, vols[0], *att.pop(vols[0])[:2])
    att[vols[2]] = attach(cinder, nova, vols[2])
    assert att[vols[2]][0]["data"]["device_path"] != paths[vols[1]]
    assert verify(paths[vols[1]], written[vols[1]].expected) == []
    write_verify(att[vols[2]][0]["data"]["device_path"])
    detach(cinder, nova, vols[1], *att.pop(vols[1])[:2])
    assert controllers(), "the last volume's controllers went with another's detach"
    write_verify(att[vols[2]][0]["data"]["device_path"])
    detach(cinder, nova, vols[2], *att.pop(vols[2])[:2])
    assert controllers() == {}
    for vol in vols:
        cinder.delete_volume(volume_id=vol)

"""NVMe over RDMA (soft-RoCE on a dummy netdev, see nvmeof_mp.lab.rdma) in every mode.

The root target agent sets rxe up on the first test's request (``Target.rdma``); where it
cannot (no rdma_rxe in the kernel, no ``rdma`` tool) every test here skips with the reason.
"""

import os
import time

import pytest
from test_gate import (NQN, STALL_LIMIT, U1, U2, controllers, dm_case, healthy_report,
                       md_degraded, record, stall_under_failure)

from nvmeof_mp.lab.workload import Writer, verify, wait_for

pytestmark = pytest.mark.usefixtures("no_leftovers")

TCP_ADDR = "127.0.0.1"


@pytest.fixture
def addr(target):
    """The soft-RoCE address (the root agent sets rxe up on first use), or a skip saying why
    there is none."""
    address, why = target.rdma()
    if address is None:
        pytest.skip("no RDMA in this VM: %s" % why)
    return address


def rdma_portal(addr, port, transport="rdma"):
    return [addr, str(port), transport]


def tcp_portal(port):
    return [TCP_ADDR, str(port), "tcp"]


def subsystem(target, addr, ports, nqn=NQN, namespaces=((1, U1),), backing=None):
    """``nqn`` on ``ports`` [(port id, trsvcid, "rdma"|"tcp")]; returns the backing path."""
    target.add_subsystem(nqn)
    path = None
    for nsid, uuid in namespaces:
        path = target.add_namespace(nqn, nsid, 64, uuid, ana_group=1, backing=backing)
    existing = target.state()["ports"]
    for pid, svc, trtype in ports:
        if str(pid) not in existing:
            target.add_port(pid, svc, traddr=addr if trtype == "rdma" else TCP_ADDR,
                            trtype=trtype)
        target.link(pid, nqn)
    return path


def transports():
    """{controller: (transport, address)} of every controller."""
    out = {}
    for name in os.listdir("/sys/class/nvme"):
        with open("/sys/class/nvme/%s/transport" % name) as f:
            transport = f.read().strip()
        with open("/sys/class/nvme/%s/address" % name) as f:
            out[name] = (transport, f.read().strip())
    return out


def write_and_verify(path, seconds=0.5):
    w = Writer(path)
    w.start()
    time.sleep(seconds)
    w.stop()
    assert not w.errors, w.errors[:5]
    assert w.ops > 0
    assert verify(path, w.expected) == []


@pytest.mark.cover("attach, I/O, detach (rdma and RoCEv2)", transport="rdma")
@pytest.mark.root_too
@pytest.mark.parametrize("transport", ["rdma", "RoCEv2"])
def test_rdma_single_path(connector, target, addr, transport):
    subsystem(target, addr, ((1, 4420, "rdma"),))
    vol = {"vol_uuid": U1, "target_nqn": NQN, "portals": [rdma_portal(addr, 4420, transport)]}
    result = connector.connect_volume(vol)
    assert result["path"].startswith("/dev/nvme") and os.access(result["path"], os.W_OK)
    seen = transports()
    assert [t for t, _ in seen.values()] == ["rdma"], seen
    write_and_verify(result["path"])
    # attaching again reuses the rdma controller (its address parsed and matched)
    again = connector.connect_volume(vol)
    assert again["path"] == result["path"] and transports() == seen
    connector.disconnect_volume(vol, result)
    assert controllers() == {}


@pytest.mark.cover("Cinder's old format with RoCEv2", transport="rdma")
@pytest.mark.root_too
def test_rdma_old_style_roce_v2(connector, target, addr):
    """Cinder's older shape: one portal with ``transport_type: RoCEv2``."""
    subsystem(target, addr, ((1, 4420, "rdma"),))
    vol = {"nqn": NQN, "transport_type": "RoCEv2", "target_portal": addr,
           "target_port": 4420, "vol_uuid": U1}
    result = connector.connect_volume(vol)
    assert [t for t, _ in transports().values()] == ["rdma"]
    write_and_verify(result["path"])
    connector.disconnect_volume(vol, result)
    assert controllers() == {}


@pytest.mark.cover("attach, I/O, detach", mode="native", transport="rdma")
@pytest.mark.native
@pytest.mark.root_too
def test_rdma_native_multipath(connector, target, addr):
    subsystem(target, addr, ((1, 4420, "rdma"), (2, 4421, "rdma")))
    target.set_ana_state(1, 1, "optimized")
    target.set_ana_state(2, 1, "non-optimized")
    vol = {"vol_uuid": U1, "target_nqn": NQN,
           "portals": [rdma_portal(addr, 4420), rdma_portal(addr, 4421)]}
    result = connector.connect_volume(vol)
    assert wait_for(lambda: sorted(p["ana_state"] for p in connector.get_path_status(vol)[0]
                                   ["paths"]) == ["non-optimized", "optimized"], 10)
    assert sorted(t for t, _ in transports().values()) == ["rdma", "rdma"]
    assert connector.get_volume_paths(vol) == [result["path"]]
    write_and_verify(result["path"])
    assert connector.get_path_status(vol)[0]["verdict"] == "healthy"
    connector.disconnect_volume(vol, result)
    assert controllers() == {}


def mixed(addr):
    return {"vol_uuid": U1, "target_nqn": NQN,
            "portals": [rdma_portal(addr, 4420), tcp_portal(4421)]}


@pytest.mark.cover("attach, I/O, detach", mode="native", transport="tcp+rdma")
@pytest.mark.native
@pytest.mark.root_too
def test_rdma_and_tcp_portals_one_volume(connector, target, addr):
    subsystem(target, addr, ((1, 4420, "rdma"), (2, 4421, "tcp")))
    vol = mixed(addr)
    result = connector.connect_volume(vol)
    assert not result["degraded"]
    assert sorted(t for t, _ in transports().values()) == ["rdma", "tcp"]
    report = healthy_report(connector, vol)
    assert len(report["paths"]) == 2, report
    write_and_verify(result["path"])
    connector.disconnect_volume(vol, result)
    assert controllers() == {}


@pytest.mark.cover("degraded attach, then heal", mode="native", transport="rdma")
@pytest.mark.native
def test_rdma_degraded_attach_then_heal(connector, target, addr):
    """The rdma port listens without the subsystem (rejected): the attach is degraded over
    tcp, and attaching again once the subsystem is there heals the rdma path."""
    subsystem(target, addr, ((2, 4421, "tcp"),))
    target.add_port(1, 4420, traddr=addr, trtype="rdma")
    vol = mixed(addr)
    t = time.monotonic()
    result = connector.connect_volume(vol)
    record("%s: attach with the rdma portal rejected %.2fs"
           % (os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], time.monotonic() - t))
    assert result["degraded"] and result["failed_portals"] == ["rdma://%s:4420" % addr]
    assert [t for t, _ in transports().values()] == ["tcp"]
    target.link(1, NQN)
    healed = connector.connect_volume(vol)
    assert not healed["degraded"] and healed["path"] == result["path"]
    assert sorted(t for t, _ in transports().values()) == ["rdma", "tcp"]
    write_and_verify(healed["path"])
    connector.disconnect_volume(vol, healed)
    assert controllers() == {}


@pytest.mark.cover("path lost under I/O", mode="native", transport="tcp+rdma")
@pytest.mark.native
@pytest.mark.parametrize("survivor", ["tcp", "rdma"])
def test_rdma_path_loss_during_io(connector, target, addr, survivor):
    """The rdma path on port 1 goes away under O_DIRECT writes and comes back."""
    subsystem(target, addr, ((1, 4420, "rdma"), (2, 4421, survivor)))
    vol = {"vol_uuid": U1, "target_nqn": NQN, "portals": [
        rdma_portal(addr, 4420),
        tcp_portal(4421) if survivor == "tcp" else rdma_portal(addr, 4421)]}
    result = connector.connect_volume(vol)
    w = stall_under_failure(result["path"], lambda: target.unlink(1, NQN),
                            lambda: target.link(1, NQN))
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    healthy_report(connector, vol)
    connector.disconnect_volume(vol, result)
    assert controllers() == {}


def rdma_replicas(target, addr, shared_backing=False):
    """Two subsystems, one per rdma port; with ``shared_backing`` the same data behind both."""
    a, b = NQN + "-a", NQN + "-b"
    backing = subsystem(target, addr, ((1, 4420, "rdma"),), nqn=a, namespaces=((1, U1),))
    subsystem(target, addr, ((2, 4421, "rdma"),), nqn=b, namespaces=((1, U2),),
              backing=backing if shared_backing else None)
    return [{"target_nqn": a, "vol_uuid": U1, "portals": [rdma_portal(addr, 4420)]},
            {"target_nqn": b, "vol_uuid": U2, "portals": [rdma_portal(addr, 4421)]}]


@pytest.mark.cover("path lost under I/O, then heal", mode="raid", transport="rdma")
def test_rdma_raid1_leg_loss_during_io(connector, target, addr):
    raid = {"volume_replicas": rdma_replicas(target, addr), "alias": "gaterdma"}
    result = connector.connect_volume(raid)
    assert result["path"] == "/dev/md/gaterdma" and not result["degraded"]
    assert sorted(t for t, _ in transports().values()) == ["rdma", "rdma"]
    w = stall_under_failure(result["path"], lambda: target.unlink(2, NQN + "-b"),
                            lambda: target.link(2, NQN + "-b"))
    assert w.max_stall < STALL_LIMIT
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    connector.check_paths(raid)                          # heal: re-add the returning leg
    assert wait_for(lambda: md_degraded(result["path"]) == 0, 30)
    connector.disconnect_volume(raid, result)
    assert not os.path.exists("/dev/md/gaterdma")


@pytest.mark.cover("path lost under I/O, then heal", mode="dm", transport="rdma")
def test_rdma_dm_multipath_leg_loss_during_io(connector, target, addr):
    dm_case(connector, target, rdma_replicas(target, addr, shared_backing=True))

"""NVMe over RDMA against the simulated host: RoCEv2 as Cinder sends it, rdma controller
addresses (no ``src_addr`` in sysfs), one volume with an rdma and a tcp portal."""

from simlab import NQN, UUID, conninfo

RADDR = "169.254.77.1"
RDMA = (RADDR, 4420, "rdma")
TCP = ("127.0.0.1", 4421, "tcp")


def mixed_target(lab):
    from nvmeof_mp.sim import SimNamespace
    return lab.sim.add_target(NQN, [RDMA, TCP], [SimNamespace(1, UUID)])


def transports(lab):
    return sorted((c.portal.transport, c.name) for c in lab.sim.ctrls.values())


def test_rdma_controller_address_has_no_src_addr(lab):
    """The kernel's rdma controller shows ``traddr=..,trsvcid=..`` only (tcp adds src_addr)."""
    mixed_target(lab)
    lab.connector.connect_volume(conninfo(portals=(RDMA, TCP)))
    by_transport = {t: name for t, name in transports(lab)}
    assert lab.sysfs("class/nvme", by_transport["rdma"], "address") == (
        "traddr=%s,trsvcid=4420" % RADDR)
    assert "src_addr=" in lab.sysfs("class/nvme", by_transport["tcp"], "address")


def test_roce_v2_and_tcp_portals_make_one_volume(lab):
    mixed_target(lab)
    info = conninfo(portals=((RADDR, "4420", "RoCEv2"), TCP))
    result = lab.connector.connect_volume(info)
    assert not result["degraded"] and result["failed_portals"] == []
    assert [t for t, _ in transports(lab)] == ["rdma", "tcp"]
    assert sorted(p["portal"] for p in result["paths"]) == [
        "rdma://%s:4420" % RADDR, "tcp://127.0.0.1:4421"]
    # a second attach finds both controllers (the rdma one by its src_addr-less address)
    again = lab.connector.connect_volume(info)
    assert again["path"] == result["path"] and lab.sim.calls["connect"] == 2
    lab.connector.disconnect_volume(info, result)
    assert lab.sim.controllers() == []


def test_rdma_path_loss_and_heal(lab):
    mixed_target(lab)
    info = conninfo(portals=(RDMA, TCP))
    result = lab.connector.connect_volume(info)
    lab.sim.path_down(NQN, 4420)
    report = lab.connector.get_path_status(info)[0]
    assert report["verdict"] == "degraded"
    states = {p["portal"]: p["state"] for p in report["paths"]}
    assert states == {"rdma://%s:4420" % RADDR: "connecting", "tcp://127.0.0.1:4421": "live"}
    lab.sim.path_up(NQN, 4420)
    lab.sim.clock.sleep(2)
    assert lab.connector.get_path_status(info)[0]["verdict"] == "healthy"
    assert lab.sim.calls["connect"] == 2          # the kernel reconnected, not us
    lab.connector.disconnect_volume(info, result)
    assert lab.sim.controllers() == []

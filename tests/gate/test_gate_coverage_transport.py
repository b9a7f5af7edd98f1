"""Coverage matrix, how the host connects (issue 15 item 6), on the real kernel in the lab VM.

- ``connect_method = nvme-cli``: the controllers are made by ``nvme connect`` processes (seen
  in the process list while the attach runs), for a single path and native multipath;
- IPv6 portals: the target listens on ``::1``; a single path over ``::1`` and native
  multipath over ``::1`` and ``127.0.0.1``.
"""

import os

import pytest
from test_gate import NQN, U1, controllers, healthy_report, one_subsystem
from test_gate_registry import io_works

pytestmark = pytest.mark.usefixtures("no_leftovers")


def addresses():
    """{controller: {"traddr": .., "trsvcid": ..}} from sysfs."""
    out = {}
    for name in os.listdir("/sys/class/nvme"):
        with open("/sys/class/nvme/%s/address" % name) as f:
            out[name] = dict(kv.split("=", 1) for kv in f.read().strip().split(","))
    return out


def volume(portals):
    return {"vol_uuid": U1, "target_nqn": NQN, "portals": [list(p) for p in portals]}


CASES = {"single": [("127.0.0.1", "4420", "tcp")],
         "native": [("127.0.0.1", "4420", "tcp"), ("127.0.0.1", "4421", "tcp")]}


@pytest.mark.parametrize("mode", [
    pytest.param("single", marks=pytest.mark.cover("connect_method nvme-cli", mode="single",
                                                   transport="tcp")),
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.cover(
        "connect_method nvme-cli", mode="native", transport="tcp")])])
def test_cover_connect_method_nvme_cli(target, mode):
    from nvmeof_mp.connector import NVMeOFConnector
    helper = None if os.getuid() == 0 else os.environ["NVMEOF_MP_ROOT_HELPER"]
    conn = NVMeOFConnector(root_helper=helper, use_multipath=mode == "native",
                           connect_method="nvme-cli")
    ports = ((1, 4420),) if mode == "single" else ((1, 4420), (2, 4421))
    one_subsystem(target, ports=ports)
    vol = volume(CASES[mode])
    target.watch_secret(NQN)            # any process whose argv names the subsystem
    try:
        result = conn.connect_volume(vol)
    finally:
        seen = target.watch_secret_result()
    # nvme-cli made the controllers (a fabrics write runs no process naming the subsystem);
    # "?": a process that ended before its name was read
    tools = {entry.split()[1] for entry in seen["seen"]}
    assert seen["seen"] and tools <= {"nvme", "?"}, seen
    assert sorted(a["trsvcid"] for a in addresses().values()) == [
        str(svc) for _, svc in ports]
    assert set(controllers().values()) == {"live"}
    assert io_works(result["path"])
    conn.disconnect_volume(vol, result)
    assert controllers() == {}


@pytest.mark.parametrize("mode", [
    pytest.param("single", marks=pytest.mark.cover("IPv6 portal", mode="single",
                                                   transport="tcp")),
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.cover(
        "IPv6 portal", mode="native", transport="tcp")])])
def test_cover_ipv6_portal(connector, target, mode):
    portals = [("::1", "4420", "tcp")] + ([("127.0.0.1", "4421", "tcp")]
                                         if mode == "native" else [])
    target.add_subsystem(NQN)
    target.add_namespace(NQN, 1, 64, U1)
    for pid, (addr, svc, _) in enumerate(portals, start=1):
        target.add_port(pid, svc, traddr=addr)
        target.link(pid, NQN)
    vol = volume(portals)
    result = connector.connect_volume(vol)
    assert not result["degraded"], result
    assert sorted((a["traddr"], a["trsvcid"]) for a in addresses().values()) == sorted(
        (addr, svc) for addr, svc, _ in portals)
    assert set(controllers().values()) == {"live"}
    report = healthy_report(connector, vol)
    assert not report["missing_portals"], report
    assert "tcp://[::1]:4420" in [p["portal"] for p in report["paths"]]
    assert io_works(result["path"])
    connector.disconnect_volume(vol, result)
    assert controllers() == {}

"""Coverage matrix, the ways in (issue 15 item 6), on the real kernel in the lab VM.

- malformed connection information through the deployed connector (lab user, root helper,
  real privsep daemon): the library's error names the key, nothing is left on the host;
- the os-brick adapter built by os-brick's own factory after ``nvmeof_mp.osbrick.register()``:
  attach, extend, detach;
- the CLI: connect (degraded), paths, heal, disconnect;
- several processes attaching volumes of one subsystem at the same moment.
"""

import json
import os
import time

import pytest
from test_gate import NQN, U1, U2, controllers, info, one_subsystem, record
from test_gate_registry import cli, conninfo_file, io_works
from test_gate_safety import WORKER_TIMEOUT, finish_worker, start_worker, stop_worker, who

from nvmeof_mp.exception import InvalidConnectionInfo, NVMeOFError
from nvmeof_mp.lab.workload import wait_for

pytestmark = pytest.mark.usefixtures("no_leftovers")

MIB = 1024 * 1024
U3 = "5e5e5e5e-0a0b-4c0d-8e0f-101112131415"
SECRET = "DHHC-1:00:c2VjcmV0LXZhbHVlLW5vdC1hLWtleQ"      # no trailing ':': malformed


def sysfs_size(device):
    with open("/sys/class/block/%s/size" % os.path.basename(os.path.realpath(device))) as f:
        return int(f.read()) * 512


def addresses():
    """{controller: its address line} from sysfs."""
    out = {}
    for name in os.listdir("/sys/class/nvme"):
        with open("/sys/class/nvme/%s/address" % name) as f:
            out[name] = f.read().strip()
    return out


# ------------------------------------------------------------------------- bad input

def _single(**extra):
    return dict(info(ports=(4420,)), **extra)


BAD = [
    # (cover mode, connection info, key the error names)
    ("single", {"vol_uuid": U1, "portals": [["127.0.0.1", "4420", "tcp"]]}, "target_nqn"),
    ("single", dict(info(ports=(4420,)), portals=[["127.0.0.1", "70000", "tcp"]]),
     "portals[0]"),
    ("native", dict(info(), portals=[["127.0.0.1", "4420", "tcp"],
                                     ["localhost", "4421", "tcp"]]), "portals[1]"),
    ("native", _single(dhchap_secret=SECRET), "dhchap_secret"),
    ("raid", {"volume_replicas": [{"target_nqn": NQN + "-a", "vol_uuid": U1,
                                   "portals": [["127.0.0.1", "4420", "tcp"]]}],
              "alias": "-not-an-alias"}, "alias"),
    ("dm", {"vol_uuid": U3, "dm_replicas": [
        {"target_nqn": NQN + "-a", "vol_uuid": U1, "portals": [["127.0.0.1", "4420", "tcp"]]},
        {"target_nqn": NQN + "-b", "vol_uuid": U2}]}, "dm_replicas[1].portals"),
]


@pytest.mark.cover("bad connection info", mode="single", transport="tcp")
@pytest.mark.cover("bad connection info", mode="native", transport="tcp")
@pytest.mark.cover("bad connection info", mode="raid", transport="tcp")
@pytest.mark.cover("bad connection info", mode="dm", transport="tcp")
def test_cover_bad_connection_info_names_the_key_and_leaves_nothing(connector, target):
    """One test for every case (a VM test's setup costs seconds).  A target that would
    accept the volume is there: a connector that ignored the bad key would attach it (and
    the test would fail)."""
    one_subsystem(target)
    for mode, bad, key in BAD:
        for call in (connector.connect_volume, connector.extend_volume,
                     lambda i: connector.disconnect_volume(i, None)):
            with pytest.raises(InvalidConnectionInfo) as raised:
                call(bad)
            assert raised.value.key == key and key in str(raised.value), (mode, raised.value)
            assert "c2VjcmV0" not in str(raised.value)    # a secret is never echoed
    # a scope ID is well-formed text to the parser; whether it names an interface of this
    # host only the daemon checks, before anything is connected or recorded
    bad = dict(info(ports=(4420,)), portals=[["fe80::1%nosuch0", "4420", "tcp"]])
    with pytest.raises(NVMeOFError, match="nosuch0"):
        connector.connect_volume(bad)
    assert controllers() == {}
    assert target.state()["subsystems"] == {NQN: ["1"]}   # the target was left as it was


# ------------------------------------------------------------------------- os-brick adapter

@pytest.fixture
def osbrick_factory(monkeypatch):
    """os-brick's factory with NVMEOF pointed at nvmeof_mp (the mappings restored after)."""
    from os_brick.initiator import connector as osb

    from nvmeof_mp import osbrick
    for name in dir(osb):
        if name.startswith("_connector_mapping"):
            monkeypatch.setattr(osb, name, dict(getattr(osb, name)))
    monkeypatch.setattr(osb, "unix_connector_list", list(osb.unix_connector_list))
    osbrick.register()
    helper = None if os.getuid() == 0 else os.environ["NVMEOF_MP_ROOT_HELPER"]
    conn = osb.InitiatorConnector.factory("NVMEOF", helper, use_multipath=True,
                                          device_scan_attempts=3)
    assert isinstance(conn, osbrick.NVMeOFConnector), type(conn)
    return conn


@pytest.mark.native
@pytest.mark.cover("os-brick factory: attach, extend, detach", mode="native", transport="tcp")
def test_cover_osbrick_factory_native(osbrick_factory, target):
    from os_brick import exception as obe
    one_subsystem(target)
    conn = osbrick_factory
    with pytest.raises(obe.InvalidParameterValue, match="portals"):
        conn.connect_volume(dict(info(), portals=[]))
    result = conn.connect_volume(info())
    assert result["type"] == "block" and result["path"].startswith("/dev/nvme")
    assert len(controllers()) == 2 and io_works(result["path"])
    assert conn.get_volume_paths(info()) == [result["path"]]
    target.resize_namespace(NQN, 1, 96)
    assert conn.extend_volume(info()) == 96 * MIB == sysfs_size(result["path"])
    conn.disconnect_volume(info(), result)
    assert controllers() == {} and not os.path.exists(result["path"])


# ------------------------------------------------------------------------- CLI

@pytest.mark.native
@pytest.mark.root_too
@pytest.mark.skipif(os.getuid() != 0, reason="the operator's CLI runs as root here (as the "
                    "lab user each command starts a daemon through sudo, ~40 s under "
                    "emulation; test_gate_registry runs connect/disconnect/heal --all so)")
@pytest.mark.cover("CLI connect, paths, heal, disconnect", mode="native", transport="tcp")
def test_cover_cli_connect_paths_heal_disconnect(target, tmp_path):
    """A degraded attach, seen by ``paths`` (exit 1, the missing portal named), healed by
    ``heal CONNINFO`` once the portal has the subsystem, then detached."""
    one_subsystem(target, ports=((1, 4420),))
    target.add_port(2, 4421)                        # listening without the subsystem: refused
    path = conninfo_file(tmp_path, info())
    attached = json.loads(cli("--json", "connect", path).stdout)
    device = attached["path"]
    assert attached["degraded"] and attached["failed_portals"] == ["tcp://127.0.0.1:4421"]
    assert len(controllers()) == 1

    by_info = cli("paths", path)                    # the volume's two portals: one missing
    assert by_info.returncode == 1 and "DEGRADED" in by_info.stdout
    assert "(missing) tcp://127.0.0.1:4421" in by_info.stdout

    target.link(2, NQN)
    healed = cli("--json", "heal", path)
    report = json.loads(healed.stdout)
    assert healed.returncode == 0 and report["healed"], report
    assert sorted(controllers().values()) == ["live", "live"]
    assert sorted(a.split(",")[1] for a in addresses().values()) == [
        "trsvcid=4420", "trsvcid=4421"]
    assert io_works(device)

    gone = cli("disconnect", path)
    assert gone.returncode == 0 and gone.stdout.strip() == "disconnected"
    assert controllers() == {}


# ------------------------------------------------------------------------- several processes

@pytest.mark.native
@pytest.mark.root_too
@pytest.mark.cover("several processes attach at once", mode="native", transport="tcp")
def test_cover_three_processes_attach_volumes_of_one_subsystem_at_once(connector, target,
                                                                      tmp_path):
    """Two fresh processes (each with its own privsep daemon) and this one attach a namespace
    each of one subsystem at the same moment, write and read a block, and detach: the
    controllers they share are made once and removed by the last detach."""
    one_subsystem(target, namespaces=((1, U1), (2, U2), (3, U3)))
    os.chmod(tmp_path, 0o777)
    go = str(tmp_path / "go")
    ready = [str(tmp_path / ("ready%d" % i)) for i in range(2)]
    workers = [start_worker("at_once", {"info": info(u), "seq": i, "go": go,
                                        "ready": ready[i]}) for i, u in enumerate((U1, U2))]
    try:
        t = time.monotonic()
        wait_for(lambda: all(map(os.path.exists, ready)) or any(
            w.poll() is not None for w in workers), WORKER_TIMEOUT - 20)
        for w in workers:
            if w.poll() is not None:
                finish_worker(w)                    # ended early: fails with its stderr
        assert all(map(os.path.exists, ready)), "the workers' daemons did not start in time"
        record("at once (%s): the workers' daemons up after %.1fs" % (
            who(), time.monotonic() - t))
        open(go, "w").close()
        start = time.monotonic()
        mine = connector.connect_volume(info(U3))
        attached = time.monotonic()
        assert io_works(mine["path"])
        connector.disconnect_volume(info(U3), mine)
        results = [finish_worker(w) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                stop_worker(w)
    results.append({"path": mine["path"], "start": start, "attached": attached})
    assert len({r["path"] for r in results}) == 3
    starts = [r["start"] for r in results]
    assert max(starts) < min(r["attached"] for r in results), results   # all in flight
    assert controllers() == {}
    record("at once (%s): 3 attaches done %.2f-%.2fs after go" % (
        who(), min(r["attached"] for r in results) - min(starts),
        max(r["attached"] for r in results) - min(starts)))

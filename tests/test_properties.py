"""get_connector_properties on the simulated host."""

import os

import pytest

from nvmeof_mp.connector import NVMeOFConnector
from nvmeof_mp.sim import HOST_ID, HOST_NQN, SYSTEM_UUID, SimHost


def props(sim, **kw):
    return NVMeOFConnector.get_connector_properties(None, kernel=sim, root=sim.root, **kw)


@pytest.mark.parametrize("value,expected", [("Y", True), ("N", False), (None, False)])
def test_native_multipath_flag(tmp_path, value, expected):
    sim = SimHost(str(tmp_path))
    path = os.path.join(sim.root, "sys/module/nvme_core/parameters/multipath")
    if value is None:
        os.unlink(path)
    else:
        with open(path, "w") as f:
            f.write(value + "\n")
    assert props(sim)["nvme_native_multipath"] is expected


def test_os_brick_keys_present(tmp_path):
    p = props(SimHost(str(tmp_path)), multipath=True)
    assert p["nqn"] == HOST_NQN and p["nvme_hostid"] == HOST_ID
    assert p["system uuid"] == SYSTEM_UUID
    for key in ("platform", "os_type", "ip", "host", "multipath", "enforce_multipath"):
        assert key in p
    assert p["multipath"] is True
    assert "single" in p["nvmeof_mp"]["modes"]


def test_missing_identity_created_once_and_stable(tmp_path):
    sim = SimHost(str(tmp_path), with_identity=False)
    first = props(sim)
    second = props(sim)
    assert first["nqn"] == second["nqn"] == "nqn.2014-08.org.nvmexpress:uuid:" + SYSTEM_UUID
    assert sim.calls["ensure_host_identity"] == 1        # files exist after the first call


def test_properties_without_nvme_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    p = props(SimHost(str(tmp_path)))
    assert p["nqn"] == HOST_NQN and p["nvmeof_mp"]["nvme_cli"] is False


def test_system_uuid_from_the_run_cache_needs_no_privileged_call(tmp_path):
    sim = SimHost(str(tmp_path))
    os.unlink(os.path.join(sim.root, "sys/class/dmi/id/product_uuid"))   # root-only on hosts
    os.makedirs(os.path.join(sim.root, "run/nvmeof_mp"))
    with open(os.path.join(sim.root, "run/nvmeof_mp/system-uuid"), "w") as f:
        f.write(SYSTEM_UUID.upper() + "\n")
    assert props(sim)["system uuid"] == SYSTEM_UUID
    assert sim.calls["read_system_uuid"] == 0
    os.unlink(os.path.join(sim.root, "run/nvmeof_mp/system-uuid"))
    assert props(sim)["system uuid"] == SYSTEM_UUID
    assert sim.calls["read_system_uuid"] == 1


def test_cli_properties_imports_no_oslo(tmp_path):
    import subprocess
    import sys
    SimHost(str(tmp_path))
    code = ("import sys; from nvmeof_mp import cli; cli.main(['--root', %r, 'properties']); "
            "print(sorted(m for m in sys.modules if m.startswith('oslo')))" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert '"nvme_native_multipath": true' in out

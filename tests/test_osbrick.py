"""Driven through the real os-brick (from PyPI): factory, properties, exceptions, signatures."""

import inspect
import subprocess
import sys

import pytest

from simlab import NQN, conninfo

osb_connector = pytest.importorskip("os_brick.initiator.connector")
from os_brick import exception as obe  # noqa: E402
from os_brick.initiator.connectors import nvmeof as osb_nvmeof  # noqa: E402

from nvmeof_mp import osbrick  # noqa: E402

PUBLIC = ("connect_volume", "disconnect_volume", "extend_volume", "get_volume_paths",
          "get_search_path", "check_valid_device", "get_connector_properties",
          "get_all_available_volumes", "supports_multipath", "check_multipath",
          "set_execute", "set_root_helper", "set_driver", "check_IO_handle_valid")


@pytest.fixture
def registered(monkeypatch):
    for name in dir(osb_connector):
        if name.startswith("_connector_mapping"):
            monkeypatch.setattr(osb_connector, name, dict(getattr(osb_connector, name)))
    monkeypatch.setattr(osb_connector, "unix_connector_list",
                        list(osb_connector.unix_connector_list))
    osbrick.register()


def factory(lab, **kwargs):
    return osb_connector.InitiatorConnector.factory(
        "NVMEOF", None, use_multipath=True, device_scan_attempts=3, kernel=lab.sim,
        root=lab.root, clock=lab.sim.clock, lock_path=lab.lock_path, **kwargs)


def test_factory_returns_our_connector_and_it_attaches(registered, lab):
    lab.target()
    conn = factory(lab)
    assert isinstance(conn, osbrick.NVMeOFConnector)
    assert osb_connector.InitiatorConnector.factory.__name__ == "factory"
    result = conn.connect_volume(conninfo())
    assert result["path"] == "/dev/nvme0n1" and lab.sim.calls["connect"] == 2
    assert conn.get_volume_paths(conninfo()) == ["/dev/nvme0n1"]
    conn.disconnect_volume(conninfo(), result)
    assert lab.sim.controllers() == []


def test_os_brick_exception_types_reach_callers(registered, lab):
    conn = factory(lab)
    lab.target()
    lab.sim.targets[NQN].hidden_nsids.add(1)
    with pytest.raises(obe.VolumeDeviceNotFound):
        conn.connect_volume(conninfo())
    with pytest.raises(obe.VolumePathsNotFound):
        conn.extend_volume(conninfo(uuid="00000000-0000-4000-8000-000000000009"))
    with pytest.raises(obe.InvalidParameterValue, match="portals"):
        conn.connect_volume(conninfo(portals=[]))


def test_get_connector_properties_through_os_brick(registered, lab, monkeypatch):
    real = osbrick.NVMeOFConnector.get_connector_properties.__func__
    monkeypatch.setattr(osbrick.NVMeOFConnector, "get_connector_properties", classmethod(
        lambda cls, rh, *a, **kw: real(cls, rh, *a, kernel=lab.sim, root=lab.root, **kw)))
    # the other connectors (iSCSI, FC...) would call os-brick's own privsep daemon
    monkeypatch.setattr(osb_connector, "unix_connector_list",
                        [c for c in osb_connector.unix_connector_list
                         if c in (osbrick.CLASS_PATH,
                                  "os_brick.initiator.connectors.base.BaseLinuxConnector")])
    assert osbrick.CLASS_PATH in osb_connector.unix_connector_list
    props = osb_connector.get_connector_properties(None, "192.0.2.7", True, False)
    assert props["ip"] == "192.0.2.7"                 # os-brick's own key untouched
    assert props["nvme_native_multipath"] is True
    assert props["nqn"].startswith("nqn.2014-08.org.nvmexpress:uuid:")
    assert "single" in props["nvmeof_mp"]["modes"]


def test_public_signatures_match_os_brick():
    for name in PUBLIC:
        theirs = inspect.signature(getattr(osb_nvmeof.NVMeOFConnector, name))
        mine = inspect.signature(getattr(osbrick.NVMeOFConnector, name))
        assert list(mine.parameters) == list(theirs.parameters), name
        for p in theirs.parameters.values():
            assert mine.parameters[p.name].default == p.default, (name, p.name)
        static = isinstance(inspect.getattr_static(osb_nvmeof.NVMeOFConnector, name),
                            staticmethod)
        assert static == isinstance(inspect.getattr_static(osbrick.NVMeOFConnector, name),
                                    staticmethod) or not static, name
    init_theirs = inspect.signature(osb_nvmeof.NVMeOFConnector.__init__).parameters
    init_mine = inspect.signature(osbrick.NVMeOFConnector.__init__).parameters
    assert list(init_mine)[:len(init_theirs)] == list(init_theirs)


def test_import_hook_registers_when_os_brick_is_imported():
    code = ("import nvmeof_mp.osbrick as o; o.install_import_hook(); "
            "from os_brick.initiator import connector as c; "
            "print(c.get_connector_mapping()['NVMEOF'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == osbrick.CLASS_PATH

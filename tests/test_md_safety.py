"""md RAID1 safety: legs must be NVMe-oF namespaces, arrays must be ours, data is never
overwritten (issue 13, items 3 and 7), and what Cinder's KumoScale driver sends (item 8)."""

import os

import pytest

from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import host
from nvmeof_mp.sim import SimHost, SimNamespace

from simlab import NQN, UUID


def _pcie(sys, native):
    """A local PCIe disk as the kernel shows it: nvme9 (transport pcie) with namespace
    nvme9n1, under the PCI device, or with native multipath under nvme-subsys9."""
    ctrl = os.path.join(sys, "devices/pci0000:00/0000:00:04.0/nvme/nvme9")
    os.makedirs(ctrl)
    with open(os.path.join(ctrl, "transport"), "w") as f:
        f.write("pcie\n")
    if native:
        sdir = os.path.join(sys, "devices/virtual/nvme-subsystem/nvme-subsys9")
        os.makedirs(os.path.join(sdir, "nvme9n1"))
        os.symlink(ctrl, os.path.join(sdir, "nvme9"))
        os.symlink(sdir, os.path.join(sys, "class/nvme-subsystem/nvme-subsys9"))
        os.symlink(os.path.join(sdir, "nvme9n1"), os.path.join(sys, "class/block/nvme9n1"))
    else:
        os.makedirs(os.path.join(ctrl, "nvme9n1"))
        os.symlink(os.path.join(ctrl, "nvme9n1"), os.path.join(sys, "class/block/nvme9n1"))


@pytest.mark.parametrize("native", [True, False])
def test_fabrics_namespace_accepts_tcp_and_refuses_pcie(tmp_path, monkeypatch, native):
    sim = SimHost(str(tmp_path / "host"), native_multipath=native)
    sim.add_target(NQN, [("127.0.0.1", 4420)], [SimNamespace(1, UUID)])
    sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420", "transport": "tcp"})
    sim.clock.sleep(5)               # the namespace shows up after a while
    _pcie(sim.sys, native)
    monkeypatch.setattr(host, "SYS", sim.sys)
    dev = "/dev/" + next(iter(sim.ctrls.values())).namespaces[1]
    assert host.fabrics_namespace(dev) == dev
    assert host.fabrics_namespace(dev[5:]) == dev
    with pytest.raises(PrivilegedArgumentError, match="not an NVMe-oF namespace"):
        host.fabrics_namespace("/dev/nvme9n1")
    with pytest.raises(PrivilegedArgumentError, match="not an NVMe-oF namespace"):
        host.fabrics_namespace("/dev/nvme7n1")          # gone
    for bad in ("/dev/sda", "/dev/nvme0n1/../sda", "/dev/nvme0c0n1", None):
        with pytest.raises(PrivilegedArgumentError):
            host.fabrics_namespace(bad)


def test_fabrics_namespace_refuses_a_subsystem_with_a_pcie_controller(tmp_path, monkeypatch):
    sim = SimHost(str(tmp_path / "host"), native_multipath=True)
    sim.add_target(NQN, [("127.0.0.1", 4420)], [SimNamespace(1, UUID)])
    sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420", "transport": "tcp"})
    sim.clock.sleep(5)               # the namespace shows up after a while
    ctrl = next(iter(sim.ctrls.values()))
    with open(os.path.join(sim.sys, "class/nvme", ctrl.name, "transport"), "w") as f:
        f.write("pcie\n")
    monkeypatch.setattr(host, "SYS", sim.sys)
    with pytest.raises(PrivilegedArgumentError, match="pcie"):
        host.fabrics_namespace("/dev/" + ctrl.namespaces[1])

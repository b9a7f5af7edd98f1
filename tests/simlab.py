"""Shared values and the simulated-host harness of the fast suite."""

from nvmeof_mp.connector import NVMeOFConnector
from nvmeof_mp.sim import SimHost, SimNamespace

NQN = "nqn.2014-08.org.e2e:subsys-native"
UUID = "8d2f4f9a-1b7e-4c2a-9a55-3f1e6c2b7d01"
UUID2 = "0b7b1c2d-3e4f-4a5b-8c6d-7e8f90a1b2c3"
P1 = ("127.0.0.1", 4420, "tcp")
P2 = ("127.0.0.1", 4421, "tcp")


def conninfo(uuid=UUID, nqn=NQN, portals=(P1, P2), **extra):
    info = {"vol_uuid": uuid, "target_nqn": nqn, "portals": [list(p) for p in portals]}
    info.update(extra)
    return info


class Lab:
    """A simulated host and a connector wired to it (patched at the kernel boundary only)."""

    def __init__(self, tmp_path, native=True, use_multipath=True, **sim_kwargs):
        self.root = str(tmp_path / "host")
        self.sim = SimHost(self.root, native_multipath=native, **sim_kwargs)
        self.use_multipath = use_multipath
        self.lock_path = str(tmp_path / "locks")
        self.connector = self.new_connector()

    def new_connector(self, **kwargs):
        kwargs.setdefault("use_multipath", self.use_multipath)
        kwargs.setdefault("lock_path", self.lock_path)
        return NVMeOFConnector(kernel=self.sim, root=self.root, clock=self.sim.clock,
                               can_open=self.sim.can_open, **kwargs)

    def target(self, nqn=NQN, ports=(4420, 4421), namespaces=((1, UUID),)):
        return self.sim.add_target(nqn, [("127.0.0.1", p) for p in ports],
                                   [SimNamespace(nsid, uuid) for nsid, uuid in namespaces])

    def sysfs(self, *parts):
        import os
        with open(os.path.join(self.root, "sys", *parts)) as f:
            return f.read().strip()


def fabrics_host(root, native=False):
    """A simulated host with two connected NVMe-oF namespaces (nvme0n1 259:0, nvme1n1 259:1)
    for the daemon's own checks, which read sysfs."""
    sim = SimHost(root, native_multipath=native)
    for i, (nqn, uuid) in enumerate(((NQN + "-a", UUID), (NQN + "-b", UUID2))):
        sim.add_target(nqn, [("127.0.0.1", 4420 + i)], [SimNamespace(1, uuid)])
        sim.connect({"nqn": nqn, "traddr": "127.0.0.1", "trsvcid": str(4420 + i),
                     "transport": "tcp"})
    sim.clock.sleep(5)
    return sim

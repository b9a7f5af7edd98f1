"""Simulated host for fast tests, demos and benchmarks (no root, no kernel)."""

from nvmeof_mp.sim.host import SimHost  # noqa: F401
from nvmeof_mp.sim.model import (HOST_ID, HOST_NQN, SYSTEM_UUID, FakeClock,  # noqa: F401
                                 SimNamespace)

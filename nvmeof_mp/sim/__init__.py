"""Simulated host for fast tests, demos and benchmarks (no root, no kernel)."""

from nvmeof_mp.sim.host import (HOST_ID, HOST_NQN, SYSTEM_UUID, FakeClock, SimHost,  # noqa: F401
                                SimNamespace)

"""What the simulated host is made of: the host's identity, its clock, and the target side
(namespaces, portals, targets) and controllers the simulated kernel keeps."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import threading

HOST_NQN = "nqn.2014-08.org.nvmexpress:uuid:3a940e64-7dfc-485f-a005-76d53d71924d"
HOST_ID = "ee968767-f125-4d4b-a901-62e3eca22e81"
SYSTEM_UUID = "3a940e64-7dfc-485f-a005-76d53d71924d"


class FakeClock:
    """Monotonic time that moves only when someone sleeps; due events fire on the way."""

    def __init__(self):
        self.now = 1000.0
        self._events = []
        self._seq = itertools.count()
        self._lock = threading.RLock()

    def monotonic(self):
        return self.now

    def at(self, delay, fn):
        with self._lock:
            heapq.heappush(self._events, (self.now + delay, next(self._seq), fn))

    def sleep(self, seconds):
        with self._lock:
            self.now += max(seconds, 0)
        self.run_due()

    def run_due(self):
        """Fire due events outside the clock's lock (they take the simulated kernel's)."""
        while True:
            with self._lock:
                if not self._events or self._events[0][0] > self.now:
                    return
                _, _, fn = heapq.heappop(self._events)
            fn()


@dataclasses.dataclass
class SimNamespace:
    nsid: int
    uuid: str | None
    nguid: str | None = None
    size_sectors: int = 131072
    ana_group: int = 1


@dataclasses.dataclass
class SimPortal:
    """Target side of one port: ``up``, ``refuse`` (ECONNREFUSED), ``timeout`` or ``stuck``."""

    traddr: str
    trsvcid: str
    transport: str = "tcp"
    mode: str = "up"
    ana: str = "optimized"

    @property
    def key(self):
        return (self.traddr, self.trsvcid, self.transport)


@dataclasses.dataclass
class SimTarget:
    nqn: str
    portals: list
    namespaces: list
    hidden_nsids: set = dataclasses.field(default_factory=set)   # "never appears"


@dataclasses.dataclass
class SimController:
    name: str
    instance: int
    subsys: str
    nqn: str
    portal: SimPortal
    hostnqn: str
    state: str = "live"
    namespaces: dict = dataclasses.field(default_factory=dict)   # nsid -> device name
    hostid: str = HOST_ID
    outages: int = 0            # counts path losses: a reconnect ends the loss timer

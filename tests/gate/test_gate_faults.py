"""Faults beyond an unlinked port, in every mode, with the longest I/O stall bounded.

Three faults hit one portal (or one replica's target) while a writer runs on each volume:

- ``drop``: every TCP segment to and from the portal is dropped silently (tc on lo), so no
  RST or ICMP tells the host: only the keep-alive timeout (``kato``) notices;
- ``restart``: the target's subsystem and its port are torn down and re-created with the same
  data (same uuid, same backing file), as a target service restart does;
- ``flap``: the link to the portal goes down and up every second, three times: its packets
  are dropped silently while down, as a bouncing link or switch port does (doc/source/
  faults.rst says why not by withdrawing the subsystem from the port).

Each fault runs once per VM and hits the two modes that VM is the usual case for at the same
time, one volume each, both written throughout: single path and md RAID1 with native
multipath off, native multipath and dm-multipath over replicas with it on.  So every mode x
fault pair runs once (doc/source/faults.rst says which ran where).  Each bound is derived
from the timeout that bounds the stall (``Fault.bound``).  Every block written is verified
and no controller, md array or dm map is left.
"""

import os
import time

import pytest

from nvmeof_mp.lab.workload import Writer, verify, wait_for
from test_gate import NQN, UTOP, controllers, info, one_subsystem, portal, record

pytestmark = pytest.mark.usefixtures("no_leftovers")

#: scheduling slack of the emulated VM (a connect, a context switch under TCG, two writers)
SLACK = 1.5
FLAPS = 3
DEFAULT_KATO = 5          # NVME_DEFAULT_KATO of the kernel; the policy leaves it unset
#: the replicas' subsystems and namespace uuids (distinct from the single volume's U1)
LEG_A, LEG_B = NQN + "-a", NQN + "-b"
UA, UB = "5f0e7d1c-2b3a-4958-8776-a5b4c3d2e1f0", "6a1b2c3d-4e5f-4a6b-9c7d-8e9fa0b1c2d3"


def kato():
    values = []
    for name in os.listdir("/sys/class/nvme"):
        try:
            with open("/sys/class/nvme/%s/kato" % name) as f:
                values.append(int(f.read()))
        except (OSError, ValueError):
            pass
    return max(values or [DEFAULT_KATO])


class Fault:
    """One fault on port ``pid``/``svc`` for subsystems ``nqns``: ``run`` injects it and heals
    it; ``window`` is how long it is meant to last."""

    def __init__(self, kind, target, nqns, pid, svc):
        self.kind, self.target, self.nqns, self.pid, self.svc = kind, target, nqns, pid, svc
        # a drop outlasts keep-alive detection (kato/2 + kato: a keep-alive every kato/2,
        # answered within kato) by kato/2
        self.window = {"drop": 2.0 * kato(), "restart": 4.0, "flap": 2.0 * FLAPS}[kind]
        self.away = 0.0         # a flap: the longest down phase, as it really was

    def run(self):
        t = self.target
        if self.kind == "drop":
            t.drop_port(self.svc)
            time.sleep(self.window)
            t.undrop_ports()
        elif self.kind == "restart":
            for nqn in self.nqns:
                t.stop_subsystem(nqn)
            time.sleep(self.window)
            for nqn in reversed(self.nqns):     # the last one stopped took the emptied port
                t.start_subsystem(nqn)
        else:
            for _ in range(FLAPS):
                t0 = time.monotonic()
                t.drop_port(self.svc)
                time.sleep(1.0)
                t.undrop_ports()
                self.away = max(self.away, time.monotonic() - t0)
                time.sleep(1.0)

    def bound(self, mode, policy, took):
        """(seconds, what bounds it) for ``mode``; ``took``: how long the fault really lasted
        (the agent's configfs and tc calls are slow in the emulated VM)."""
        if self.kind == "drop":
            # Linux 6.1: keep-alive expiry starts error recovery after kato/2 + kato, but the
            # I/O in flight is neither failed over nor failed until the network is back, in
            # every mode (doc/source/faults.rst).  Then TCP resends (data, or a reconnect's
            # SYN) with exponential backoff: the next try comes at most as long after the
            # outage's end as the outage lasted; a reconnect then waits reconnect_delay.
            return (2 * took + policy.reconnect_delay + SLACK,
                    "2 x outage (TCP backoff) + reconnect_delay")
        if self.kind == "flap":
            # down phases far shorter than keep-alive detection: no side notices, nothing
            # fails over or reconnects; TCP resends once the link is back (backoff as above)
            return 2 * self.away + SLACK, "2 x longest down phase (TCP backoff)"
        if mode in ("raid", "dm"):      # md / dm fail the leg once its I/O fails
            return policy.leg_fast_io_fail_tmo + SLACK, "leg_fast_io_fail_tmo"
        # single path, and native multipath losing both portals (a restart): I/O queues
        # (no fast_io_fail_tmo) until a reconnect, tried every reconnect_delay, gets through
        return took + policy.reconnect_delay + SLACK, "outage + reconnect_delay"


def measure(volumes, fault, policy):
    """``volumes``: [(mode, device)].  Writes all of them through the fault; returns the
    writers.  Asserts no error, every block verified and each mode's stall under its bound."""
    writers = [(mode, Writer(device)) for mode, device in volumes]
    for _, w in writers:
        w.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    fault.run()
    took = time.monotonic() - t0
    time.sleep(2.0)
    for _, w in writers:
        w.stop()
    over = []
    for (mode, w), (_, device) in zip(writers, volumes, strict=True):
        assert not w.errors, (mode, w.errors[:5])
        assert w.ops > 0, mode
        assert verify(device, w.expected) == [], mode
        bound, why = fault.bound(mode, policy, took)
        record("fault=%s mode=%s: longest I/O stall %.2fs (bound %.1fs: %s), fault %.1fs, "
               "%d writes, %d blocks verified"
               % (fault.kind, mode, w.max_stall, bound, why, took, w.ops, len(w.expected)))
        if w.max_stall >= bound:
            over.append((mode, round(w.max_stall, 2), round(bound, 1), why))
    assert not over, over
    return writers


def recovered():
    """Every controller live again (the faulted ones reconnect) within 30 s."""
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30), controllers()


def replica_pair(target, shared_backing):
    """Two one-portal replicas: LEG_A on port 1 (4420), LEG_B on port 2 (4421)."""
    backing = None
    for n, (nqn, uuid, pid) in enumerate(((LEG_A, UA, 1), (LEG_B, UB, 2))):
        target.add_subsystem(nqn)
        path = target.add_namespace(nqn, 1, 64, uuid, ana_group=1, backing=backing)
        if shared_backing and n == 0:
            backing = path
        target.link(pid, nqn)
    return [{"target_nqn": LEG_A, "vol_uuid": UA, "portals": [portal(4420)]},
            {"target_nqn": LEG_B, "vol_uuid": UB, "portals": [portal(4421)]}]


def fault_at_port_1(kind, target, nqns):
    return Fault(kind, target, nqns, 1, 4420)


FAULTS = ("drop", "restart", "flap")
SCENARIO = {"drop": "silent packet loss under I/O", "restart": "target restart under I/O",
            "flap": "path flapping under I/O"}


def cover(modes):
    return [pytest.param(kind, marks=[pytest.mark.cover(SCENARIO[kind], mode=m)
                                      for m in modes]) for kind in FAULTS]


@pytest.mark.no_native
@pytest.mark.parametrize("kind", cover(("single", "raid")))
def test_single_path_and_raid1(connector, target, kind):
    """Native multipath off: a single-path volume (``use_multipath=False``, two portals, one
    controller to the first) and an md RAID1 volume; the fault hits port 1, where the single
    path's controller and the array's first leg are."""
    from nvmeof_mp.connector import NVMeOFConnector
    single = NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                             use_multipath=False)
    one_subsystem(target)
    raid = {"volume_replicas": replica_pair(target, False), "alias": "faultvol"}
    vol = single.connect_volume(info())
    assert len(controllers()) == 1          # the first portal that answers
    md = connector.connect_volume(raid)
    assert not md["degraded"]
    measure([("single", vol["path"]), ("raid", md["path"])],
            fault_at_port_1(kind, target, [NQN, LEG_A]), connector.policy)
    recovered()
    connector.disconnect_volume(raid, md)
    single.disconnect_volume(info(), vol)


@pytest.mark.native
@pytest.mark.parametrize("kind", cover(("native", "dm")))
def test_native_multipath_and_dm(connector, target, kind):
    """Native multipath on: a volume with two portals (port 1 ANA-optimized) and a
    dm-multipath volume over two one-portal replicas; the fault hits port 1, the native
    volume's optimized path and the map's first leg."""
    one_subsystem(target, ana=True)
    dm = {"vol_uuid": UTOP, "dm_replicas": replica_pair(target, True)}
    vol = connector.connect_volume(info())
    mp = connector.connect_volume(dm)
    assert not mp["degraded"]
    measure([("native", vol["path"]), ("dm", mp["path"])],
            fault_at_port_1(kind, target, [NQN, LEG_A]), connector.policy)
    recovered()
    connector.disconnect_volume(dm, mp)
    connector.disconnect_volume(info(), vol)


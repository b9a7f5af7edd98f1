"""Faults beyond an unlinked port, in every mode, with the longest I/O stall bounded.

Three faults hit one portal (or one replica's target) while a writer runs:

- ``drop``: every TCP segment to and from the portal is dropped silently (tc on lo), so no
  RST or ICMP tells the host: only the keep-alive timeout (``kato``) notices;
- ``restart``: the target's subsystem and its port are torn down and re-created with the same
  data (same uuid, same backing file), as a target service restart does;
- ``flap``: the portal goes down and up every second, several times.

Each bound is derived from the timeouts that bound the stall (doc/source/faults.rst):
``kato`` (the kernel's default, read from sysfs), ``reconnect_delay`` and
``leg_fast_io_fail_tmo`` of the connector's policy.  Every block written is verified and no
controller, md array or dm map is left.  Lean on purpose: each mode runs in the VM where it is
the interesting case (single path and RAID1 with native multipath off, native multipath and
DM over native-multipathed replicas with it on), so each VM runs six of these.
"""

import os
import time

import pytest

from nvmeof_mp.lab.workload import Writer, verify, wait_for
from test_gate import NQN, controllers, info, one_subsystem, record, replicas

pytestmark = pytest.mark.usefixtures("no_leftovers")

#: scheduling slack of the emulated VM (a connect, a context switch under TCG)
SLACK = 1.5
FLAPS = 4
DEFAULT_KATO = 5          # NVME_DEFAULT_KATO of the kernel; the policy leaves it unset


def kato():
    values = []
    for name in os.listdir("/sys/class/nvme"):
        try:
            with open("/sys/class/nvme/%s/kato" % name) as f:
                values.append(int(f.read()))
        except (OSError, ValueError):
            pass
    return max(values or [DEFAULT_KATO])


def drop_for(policy):
    """Longer than keep-alive detection (a keep-alive every kato/2, answered within kato)."""
    return 2 * kato() + 2


class Fault:
    """One fault on portal ``pid``/``svc`` of subsystem ``nqn``: ``run`` injects it and heals
    it; ``window`` is how long the portal is away; ``bound`` the longest stall allowed."""

    def __init__(self, kind, target, nqn, pid, svc, policy):
        self.kind, self.target, self.nqn, self.pid, self.svc = kind, target, nqn, pid, svc
        self.policy = policy
        self.window = {"drop": drop_for(policy), "restart": 4.0, "flap": 2.0 * FLAPS}[kind]

    def run(self):
        t = self.target
        if self.kind == "drop":
            t.drop_port(self.svc)
            time.sleep(self.window)
            t.undrop_ports()
        elif self.kind == "restart":
            t.stop_subsystem(self.nqn)
            time.sleep(self.window)
            t.start_subsystem(self.nqn)
        else:
            for _ in range(FLAPS):
                t.unlink(self.pid, self.nqn)
                time.sleep(1.0)
                t.link(self.pid, self.nqn)
                time.sleep(1.0)

    def bound(self, mode, took):
        """(seconds, what bounds it); ``took``: how long the portal was really away (the
        agent's configfs and tc calls are slow in the emulated VM, so not just the window)."""
        p, window = self.policy, took
        if self.kind == "drop":
            # Linux 6.1: the keep-alive timeout starts error recovery after kato/2 + kato,
            # but the I/O in flight is neither failed over nor failed until the network comes
            # back (doc/source/faults.rst); then TCP retransmits, backed off by then to about
            # half the window at most.  The same in every mode.
            if mode == "single":
                return (window * 1.5 + p.reconnect_delay + SLACK,
                        "window + TCP retransmit backoff + reconnect_delay")
            return window * 1.5 + SLACK, "window + TCP retransmit backoff"
        if mode == "single":            # I/O queues (no fast_io_fail) until a reconnect
            return window + p.reconnect_delay + SLACK, "window + reconnect_delay"
        if mode == "native":            # the kernel requeues on the other path
            if self.kind == "restart":      # both portals are the restarted target's
                return window + p.reconnect_delay + SLACK, "window + reconnect_delay"
            return 2.0, "none: a closed connection fails over at once"
        # replica legs: md / dm fail the leg after leg_fast_io_fail_tmo
        ff = p.leg_fast_io_fail_tmo
        return ff + 1.0, "leg_fast_io_fail_tmo"


def measure(device, fault, mode):
    w = Writer(device)
    w.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    fault.run()
    took = time.monotonic() - t0
    time.sleep(2.0)
    w.stop()
    assert not w.errors, w.errors[:5]
    assert w.ops > 0
    assert verify(device, w.expected) == []
    bound, why = fault.bound(mode, took)
    record("fault=%s mode=%s: longest I/O stall %.2fs (bound %.1fs: %s), fault %.1fs, "
           "%d writes, %d blocks verified"
           % (fault.kind, mode, w.max_stall, bound, why, took, w.ops, len(w.expected)))
    assert w.max_stall < bound, (w.max_stall, bound, why)
    return w


FAULTS = ("drop", "restart", "flap")


def recovered(kind):
    """Every controller live again within 30 s.  After a flap, nvmet of 6.1 in the lab kept
    refusing connections (ECONNREFUSED) on the flapped port for longer: recorded, not
    asserted (doc/source/faults.rst); the volume's I/O was verified by then."""
    live = wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    if not live and kind == "flap":
        record("after flap: controllers %s" % controllers())
        return
    assert live, controllers()


SINGLE_FLAP = pytest.mark.xfail(
    reason="after a flap nvmet (6.1) refused the port for about a minute; a single path "
    "queues I/O all that time (66 s measured, doc/source/faults.rst)", strict=False)


@pytest.mark.no_native
@pytest.mark.parametrize("kind", ["drop", "restart", pytest.param("flap", marks=SINGLE_FLAP)])
def test_single_path_two_portals(target, kind):
    from nvmeof_mp.connector import NVMeOFConnector
    single = NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                             use_multipath=False)
    one_subsystem(target)
    result = single.connect_volume(info())
    assert len(controllers()) == 1          # the first portal that answers
    measure(result["path"], Fault(kind, target, NQN, 1, 4420, single.policy), "single")
    recovered(kind)
    single.disconnect_volume(info(), result)


@pytest.mark.native
@pytest.mark.parametrize("kind", FAULTS)
def test_native_multipath(connector, target, kind):
    one_subsystem(target, ana=True)
    result = connector.connect_volume(info())
    measure(result["path"], Fault(kind, target, NQN, 1, 4420, connector.policy), "native")
    recovered(kind)
    connector.disconnect_volume(info(), result)


@pytest.mark.no_native
@pytest.mark.parametrize("kind", FAULTS)
def test_raid1(connector, target, kind):
    raid = {"volume_replicas": replicas(target), "alias": "faultvol"}
    result = connector.connect_volume(raid)
    assert not result["degraded"]
    measure(result["path"], Fault(kind, target, NQN + "-b", 2, 4421, connector.policy),
            "raid1")
    recovered(kind)
    connector.disconnect_volume(raid, result)


@pytest.mark.native
@pytest.mark.parametrize("kind", FAULTS)
def test_dm_over_native_multipath(connector, target, kind):
    dm = {"vol_uuid": "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11",
          "dm_replicas": replicas(target, shared_backing=True)}
    result = connector.connect_volume(dm)
    assert not result["degraded"]
    measure(result["path"], Fault(kind, target, NQN + "-a", 1, 4420, connector.policy), "dm")
    recovered(kind)
    connector.disconnect_volume(dm, result)

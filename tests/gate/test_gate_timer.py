"""The heal timer brings volumes back with no call from anyone (runs in the lab VM, root pass).

The lab VM has no systemd as PID 1: ``nvmeof_mp.lab.timer`` runs the installed units
(etc/systemd/nvmeof-mp-heal.{timer,service}: their ExecStart, as root) on the timer's period,
shortened here so the test does not wait 15 s per run.  The test breaks a path or a leg and
only watches: every reconnect and re-add is the timer's ``nvmeof-mp heal --all``.
"""

import json
import os
import subprocess
import sys

import pytest
from test_gate import (NQN, U1, controllers, info, md_degraded, one_subsystem, record,
                       replicas)

from nvmeof_mp.lab.workload import Writer, verify, wait_for

pytestmark = [pytest.mark.usefixtures("no_leftovers"), pytest.mark.root_too]

PERIOD = 5.0              # a heal takes 0.6-3.5 s in the VM; shorter periods only skip ticks
HEAL_DEADLINE = 90.0


@pytest.fixture
def heal_timer():
    if os.getuid() != 0:
        pytest.skip("the heal timer runs as root: the root pass runs this")
    from nvmeof_mp.lab import timer
    out = os.environ.get("NVMEOF_MP_LAB_OUT") or "/tmp"
    with timer.running(period_override=PERIOD, log=os.path.join(out, "heal-timer.log"),
                       kill_on_exit=True) as runs:
        yield runs


def short_connector():
    """An attaching service with a finite ctrl_loss_tmo: the kernel gives a lost controller
    up after 3 s and deletes it."""
    from nvmeof_mp.connector import NVMeOFConnector
    from nvmeof_mp.policy import TimeoutPolicy
    return NVMeOFConnector(root_helper=None, use_multipath=True,
                           policy=TimeoutPolicy(ctrl_loss_tmo=3, reconnect_delay=1))


def events():
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    out = subprocess.run([sys.executable, "-m", "nvmeof_mp.cli", "--json", "status"], env=env,
                         capture_output=True, text=True, timeout=120).stdout
    return [text for entry in json.loads(out) for _, text in entry["events"]]


@pytest.mark.cover("heal timer reconnects a deleted path", mode="native")
def test_timer_reconnects_a_path_the_kernel_deleted_after_ctrl_loss_tmo(target, heal_timer):
    one_subsystem(target, ports=((1, 4420),))
    conn = short_connector()
    result = conn.connect_volume(info(ports=(4420,)))
    runs = heal_timer.count
    target.unlink(1, NQN)
    assert wait_for(lambda: controllers() == {}, 30), "ctrl_loss_tmo did not delete it"
    target.link(1, NQN)
    # nobody calls anything now: the timer's heal --all reconnects the registered volume
    assert wait_for(lambda: set(controllers().values()) == {"live"}, HEAL_DEADLINE), (
        "not reconnected by the timer after %d runs" % (heal_timer.count - runs))
    assert wait_for(lambda: conn.get_volume_paths(info(ports=(4420,))), 20)
    device = conn.get_volume_paths(info(ports=(4420,)))[0]
    w = Writer(device)
    w.start()
    wrote = wait_for(lambda: w.ops > 20, 10)
    w.stop()
    assert wrote and not w.errors and verify(device, w.expected) == [], w.errors[:5]
    assert "heal: down -> healthy" in events()
    conn.disconnect_volume(info(ports=(4420,)), result)


@pytest.mark.cover("heal timer re-adds a failed leg", mode="raid")
def test_timer_re_adds_a_raid_leg_that_failed(target, heal_timer):
    from nvmeof_mp.connector import NVMeOFConnector
    conn = NVMeOFConnector(root_helper=None, use_multipath=True)
    raid = {"volume_replicas": replicas(target), "alias": "timervol"}
    result = conn.connect_volume(raid)
    w = Writer(result["path"])
    w.start()
    target.unlink(2, NQN + "-b")
    assert wait_for(lambda: md_degraded(result["path"]) == 1, 30), "the leg did not fail"
    target.link(2, NQN + "-b")
    # the leg's controller reconnects by itself; md keeps the leg faulty until re-added
    assert wait_for(lambda: md_degraded(result["path"]) == 0, HEAL_DEADLINE), (
        "the timer did not re-add the leg")
    w.stop()
    assert not w.errors and w.ops > 0 and verify(result["path"], w.expected) == []
    assert any("md legs re-added" in text for text in events())
    conn.disconnect_volume(raid, result)
    assert not os.path.exists("/dev/md/timervol")


#: dm over two replicas that each have both portals (native multipath in each)
LEG_C, LEG_D = NQN + "-c", NQN + "-d"
UC, UD = "7b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d", "8c3d4e5f-6071-4b2c-9d3e-4f5a6b7c8d9e"
UTOP2 = "9d4e5f60-7182-4c3d-8e4f-5a6b7c8d9e0f"


@pytest.fixture
def udev_heal(tmp_path):
    """The shipped udev rule (etc/udev/rules.d) installed with its ``systemctl start`` of
    the heal service replaced by the lab runner's trigger file, and the runner with a
    period nobody waits for: any heal is the rule's."""
    if os.getuid() != 0:
        pytest.skip("the heal service runs as root: the root pass runs this")
    from nvmeof_mp.lab import timer
    if not os.path.exists("/run/udev/control"):
        pytest.skip("udev is not running in this VM")
    trigger = str(tmp_path / "start-heal")
    out = os.environ.get("NVMEOF_MP_LAB_OUT") or "/tmp"
    with timer.running(period_override=3600, first_delay=3600, trigger=trigger,
                       log=os.path.join(out, "heal-timer.log"), kill_on_exit=True) as runs, \
            timer.udev_rule_installed(trigger):
        yield runs


@pytest.mark.cover("one fabric lost under I/O: dm paths reinstated by the udev-started heal",
                   mode="dm-native")
@pytest.mark.native
def test_udev_heal_brings_back_dm_over_native_replicas_when_a_fabric_is_lost(
        connector, target, udev_heal):
    """Both replicas lose their optimized portal (port 1: one fabric) silently under I/O.
    dm's fail-fast I/O is not failed over inside native multipath: the kernel fails both
    replicas in the map, which then queues.  The shipped udev rule starts the heal on the
    first PATH_FAILED; it reinstates both (each still has port 2), and writes go on while
    port 1 is still dropped."""
    target.add_port(1, 4420)
    target.add_port(2, 4421)
    backing = None
    for nqn, uuid in ((LEG_C, UC), (LEG_D, UD)):         # one backing file: one volume
        target.add_subsystem(nqn)
        path = target.add_namespace(nqn, 1, 64, uuid, ana_group=1, backing=backing)
        backing = backing or path
        target.link(1, nqn)
        target.link(2, nqn)
    target.set_ana_state(1, 1, "optimized")                # I/O goes through port 1
    target.set_ana_state(2, 1, "non-optimized")
    dm = {"vol_uuid": UTOP2, "dm_replicas": [info(UC, LEG_C), info(UD, LEG_D)]}
    result = connector.connect_volume(dm)
    assert not result["degraded"], result
    w = Writer(result["path"])
    w.start()
    assert wait_for(lambda: w.ops > 10, 20)
    target.drop_port(4420)
    try:
        assert udev_heal.wait_for_runs(1, HEAL_DEADLINE), "no heal started (no PATH_FAILED?)"
        failed = [line for line in open(udev_heal.log_path) if "(udev)" in line]
        assert failed, "the heal was not the udev rule's"
        ops = w.ops
        assert wait_for(lambda: w.ops > ops + 10, 30), (
            "writes did not go on over port 2 after the heal", connector.kernel.dm_status(UTOP2))
        assert set(connector.kernel.dm_status(UTOP2).values()) == {"A"}
    finally:
        target.undrop_ports()
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 60)
    w.stop()
    record("dm over native replicas, one fabric dropped: longest I/O stall %.2fs, heal runs %d"
           % (w.max_stall, udev_heal.count))
    assert not w.errors and verify(result["path"], w.expected) == [], w.errors[:5]
    connector.disconnect_volume(dm, result)


_ = U1

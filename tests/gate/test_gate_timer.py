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
from test_gate import NQN, U1, controllers, info, md_degraded, one_subsystem, replicas

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


_ = U1

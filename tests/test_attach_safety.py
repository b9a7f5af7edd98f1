"""Attach safety: timeouts of reused controllers, single-path failover at attach time, no leak
after a failed attach (whatever failed), and per-volume host NQNs with a host ID of their own.
"""

import os
import uuid

import pytest

from nvmeof_mp import plan as planner
from nvmeof_mp.exception import TargetUnreachable, VolumeDeviceNotFound
from nvmeof_mp.policy import TimeoutPolicy
from nvmeof_mp.sim import HOST_ID

from simlab import NQN, P1, P2, UUID, UUID2, conninfo

DAEMON_DIED = "Premature eof waiting for privileged process"


def write_attr(lab, ctrl, attr, value):
    """What an administrator (or another tool) set on a controller by hand."""
    with open(os.path.join(lab.root, "sys/class/nvme", ctrl, attr), "w") as f:
        f.write("%s\n" % value)


# -- item 3: ctrl_loss_tmo ---------------------------------------------------------------------

def test_default_policy_reconnects_forever_like_os_brick(lab):
    assert TimeoutPolicy().ctrl_loss_tmo == -1
    from nvmeof_mp import config
    from oslo_config import cfg
    assert config.policy_from_conf(cfg.ConfigOpts()).ctrl_loss_tmo == -1
    lab.target()
    lab.connector.connect_volume(conninfo())
    for ctrl in ("nvme0", "nvme1"):
        assert lab.sysfs("class/nvme", ctrl, "ctrl_loss_tmo") == "off"     # the kernel's -1


def test_ten_minute_target_outage_keeps_the_device(lab):
    """os-brick bug 1964385: the device must survive an array upgrade."""
    lab.target()
    result = lab.connector.connect_volume(conninfo())
    for port in (4420, 4421):
        lab.sim.path_down(NQN, port)
    lab.sim.clock.sleep(11 * 60)
    for port in (4420, 4421):
        lab.sim.path_up(NQN, port)
    lab.sim.clock.sleep(2)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    assert lab.connector.get_volume_paths(conninfo()) == [result["path"]]


def test_sim_gives_up_a_finite_controller_after_ctrl_loss_tmo(lab):
    lab.target()
    lab.new_connector(policy=TimeoutPolicy(ctrl_loss_tmo=60)).connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)
    lab.sim.clock.sleep(59)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    lab.sim.clock.sleep(2)
    assert lab.sim.controllers(NQN) == ["nvme1"]


def test_attach_during_an_outage_raises_a_finite_ctrl_loss_tmo_in_time(lab):
    lab.target(namespaces=((1, UUID), (2, UUID2)))
    lab.new_connector(policy=TimeoutPolicy(ctrl_loss_tmo=60)).connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)
    lab.sim.clock.sleep(30)
    lab.connector.connect_volume(conninfo(uuid=UUID2))       # default policy, nvme1 live
    assert lab.sysfs("class/nvme/nvme0/ctrl_loss_tmo") == "off"
    lab.sim.clock.sleep(120)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]


def test_infinite_ctrl_loss_tmo_of_a_foreign_controller_is_never_lowered(make_lab):
    lab = make_lab(use_multipath=False)
    lab.target(ports=(4420,))
    lab.connector.connect_volume(conninfo(portals=[P1]))
    write_attr(lab, "nvme0", "ctrl_loss_tmo", "off")     # another tool: reconnect forever
    write_attr(lab, "nvme0", "fast_io_fail_tmo", "off")
    finite = lab.new_connector(policy=TimeoutPolicy(ctrl_loss_tmo=60, fast_io_fail_tmo=5))
    finite.connect_volume(conninfo(portals=[P1]))
    assert lab.sysfs("class/nvme/nvme0/ctrl_loss_tmo") == "off"
    assert lab.sysfs("class/nvme/nvme0/fast_io_fail_tmo") == "off"


def test_finite_timeouts_of_reused_controllers_are_only_raised(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    write_attr(lab, "nvme0", "ctrl_loss_tmo", "600")     # made by an older release
    write_attr(lab, "nvme1", "ctrl_loss_tmo", "7200")    # longer than a finite policy
    conn = lab.new_connector(policy=TimeoutPolicy(ctrl_loss_tmo=1800))
    conn.connect_volume(conninfo())
    assert lab.sysfs("class/nvme/nvme0/ctrl_loss_tmo") == "1800"     # raised
    assert lab.sysfs("class/nvme/nvme1/ctrl_loss_tmo") == "7200"     # never lowered
    lab.connector.connect_volume(conninfo())                           # default policy: -1
    assert lab.sysfs("class/nvme/nvme0/ctrl_loss_tmo") == "off"


def test_replica_leg_policy_does_not_lower_fast_io_fail_of_a_reused_controller(lab):
    from test_replicated import raid_info
    lab.target(nqn=NQN + "-a", ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQN + "-b", ports=(4421,), namespaces=((1, UUID2),))
    # the first replica's subsystem is already connected by a single-path attach (queueing)
    lab.connector.connect_volume(conninfo(nqn=NQN + "-a", portals=[P1]))
    assert lab.sysfs("class/nvme/nvme0/fast_io_fail_tmo") == "off"
    lab.connector.connect_volume(raid_info())
    assert lab.sysfs("class/nvme/nvme0/fast_io_fail_tmo") == "off"   # reused: not lowered
    assert lab.sysfs("class/nvme/nvme1/fast_io_fail_tmo") == "1"     # created: the policy


def test_lowering_reconnect_delay_keeps_the_controller_loss_time():
    """The kernel stores ctrl_loss_tmo as a number of reconnects: a shorter reconnect_delay
    alone would shorten the time before the controller is given up."""
    from nvmeof_mp.topology import Controller
    ctrl = Controller("nvme3", NQN, "live", "tcp", "127.0.0.1", "4420",
                      ctrl_loss_tmo="600", reconnect_delay="10", fast_io_fail_tmo="off")
    wanted = {"ctrl_loss_tmo": 300, "reconnect_delay": 2}
    updates = planner.attr_updates([ctrl], wanted)
    assert list(updates["nvme3"].items()) == [("reconnect_delay", 2), ("ctrl_loss_tmo", 600)]
    off = Controller("nvme4", NQN, "live", "tcp", "127.0.0.1", "4420",
                     ctrl_loss_tmo="off", reconnect_delay="10", fast_io_fail_tmo="off")
    assert planner.attr_updates([off], wanted) == {"nvme4": {"reconnect_delay": 2}}


# -- item 4: single path -----------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_single_path_with_its_only_controller_connecting_tries_the_next_portal(make_lab,
                                                                                native):
    lab = make_lab(native=native, use_multipath=False)
    lab.target()
    lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers(NQN) == ["nvme0"]
    lab.sim.path_down(NQN, 4420)                    # array upgrade on the first port
    start = lab.sim.clock.now
    result = lab.connector.connect_volume(conninfo())
    assert lab.sim.clock.now - start < 1.0          # no wait for the device timeout
    states = {p["portal"]: p["state"] for p in result["paths"]}
    assert states["tcp://127.0.0.1:4421"] == "live"
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    # native: the same head with a live path; else the plain namespace of the live controller
    assert result["path"] == ("/dev/nvme0n1" if native else "/dev/nvme1n1")


def test_single_path_new_volume_on_a_subsystem_whose_controller_is_connecting(make_lab):
    lab = make_lab(use_multipath=False)
    lab.target(namespaces=((1, UUID), (2, UUID2)))
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)
    result = lab.connector.connect_volume(conninfo(uuid=UUID2))
    assert lab.sysfs("class/block", result["path"][5:], "uuid") == UUID2
    assert lab.sim.calls["connect"] == 2


def test_namespace_without_a_usable_path_is_not_success(make_lab):
    lab = make_lab(use_multipath=False)
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4420)
    lab.sim.path_down(NQN, 4421)                    # every portal down, namespace still shown
    with pytest.raises(VolumeDeviceNotFound, match=UUID):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers(NQN) == ["nvme0"]    # not ours to delete


def test_native_multipath_needs_one_usable_path(lab):
    lab.target()
    for port in (4420, 4421):
        lab.sim.portal(NQN, port).ana = "inaccessible"
    with pytest.raises(VolumeDeviceNotFound):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers() == []              # what this attach created is gone


def test_plan_single_path_connects_portals_without_a_controller_when_none_is_live(lab):
    lab.target(ports=(4420, 4421, 4422))
    three = conninfo(portals=[P1, P2, ("127.0.0.1", 4422, "tcp")])
    lab.new_connector(use_multipath=True).connect_volume(three)
    lab.sim.path_down(NQN, 4421)
    lab.sim.path_down(NQN, 4420)
    from nvmeof_mp import connection
    target = connection.parse(three).target
    snap = lab.connector.sysfs.snapshot([NQN])
    plan = planner.plan_connect(target, snap, None, all_portals=False)
    # the three portals were connected at once: which got which name is the kernel's order
    by_portal = {str(c.portal): c.name for c in snap.controllers(NQN)}
    assert plan.connect == () and [n for _, n in plan.reuse] == [
        by_portal[str(p)] for p in target.portals]
    lab.sim.expire(by_portal["tcp://127.0.0.1:4422"])
    snap = lab.connector.sysfs.snapshot([NQN])
    plan = planner.plan_connect(target, snap, None, all_portals=False)
    assert [str(p) for p in plan.connect] == ["tcp://127.0.0.1:4422"]


# -- item 6: nothing leaks, whatever fails -----------------------------------------------------

def dying_daemon(lab, when="after", ports=None):
    """The privsep daemon dies during connect: before or after the kernel made the
    controller; the reply is lost either way (oslo.privsep raises OSError)."""
    real = lab.sim.connect

    def connect(opts, hold=None):
        if ports is None or int(opts["trsvcid"]) in ports:
            if when == "after":
                real(opts, hold)
            raise OSError(DAEMON_DIED)
        return real(opts, hold)
    lab.sim.connect = connect


@pytest.mark.parametrize("use_multipath", [True, False])
@pytest.mark.parametrize("when", ["before", "after"])
def test_daemon_dying_during_connect_leaves_no_controller(make_lab, use_multipath, when):
    lab = make_lab(use_multipath=use_multipath)
    lab.target()
    dying_daemon(lab, when)
    with pytest.raises(OSError, match=DAEMON_DIED):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers() == []


def test_daemon_dying_on_one_portal_keeps_preexisting_controllers(lab):
    lab.target(namespaces=((1, UUID), (2, UUID2)))
    lab.connector.connect_volume(conninfo(portals=[P1]))
    dying_daemon(lab, "after", ports={4421})
    with pytest.raises(OSError):
        lab.connector.connect_volume(conninfo(uuid=UUID2))
    assert lab.sim.controllers() == ["nvme0"]


def test_unknown_controller_name_in_a_reply_is_found_and_used(make_lab):
    """nvme-cli succeeded but its output could not be parsed: the controller exists."""
    lab = make_lab(use_multipath=False)
    lab.target()
    real = lab.sim.connect
    lab.sim.connect = lambda opts, hold=None: dict(real(opts, hold), controller=None)
    result = lab.connector.connect_volume(conninfo())
    assert result["path"] == "/dev/nvme0n1"
    assert lab.sim.controllers() == ["nvme0"] and lab.sim.calls["connect"] == 1


def test_unknown_controller_name_is_cleaned_up_when_the_attach_fails(make_lab):
    lab = make_lab(use_multipath=False)
    lab.target().hidden_nsids.add(1)                # the namespace never shows up
    real = lab.sim.connect
    lab.sim.connect = lambda opts, hold=None: dict(real(opts, hold), controller=None)
    with pytest.raises(VolumeDeviceNotFound):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers() == []


def test_unreadable_kernel_reply_after_the_controller_was_made_is_not_a_leak(make_lab):
    """The write to /dev/nvme-fabrics went through, its reply had no instance=: the
    controller exists although the reply reads as a failure (no errno)."""
    lab = make_lab(use_multipath=False)
    target = lab.target()
    real = lab.sim.connect

    def connect(opts, hold=None):
        real(opts, hold)
        return {"error": "unexpected reply ''", "errno": None, "already": False}
    lab.sim.connect = connect
    result = lab.connector.connect_volume(conninfo())
    assert result["failed_portals"] == [] and lab.sim.controllers() == ["nvme0"]
    lab.connector.disconnect_volume(conninfo(), result)
    target.hidden_nsids.add(1)
    with pytest.raises(VolumeDeviceNotFound):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers() == []


@pytest.mark.parametrize("error", [RuntimeError("interrupted"), KeyError("state")])
def test_any_exception_while_waiting_for_the_device_leaves_no_controller(lab, error):
    lab.target()
    lab.sim.ns_delay = 1.0

    def fail():
        raise error
    lab.sim.clock.at(0.5, fail)                     # raised inside the wait for the device
    with pytest.raises(type(error)):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers() == []


def test_failed_rescan_of_reused_controllers_deletes_nothing(lab):
    target = lab.target()
    lab.connector.connect_volume(conninfo())
    target.namespaces.append(__import__("nvmeof_mp.sim", fromlist=["x"]).SimNamespace(2, UUID2))

    def rescan(names):
        raise OSError(DAEMON_DIED)
    lab.sim.rescan_controllers = rescan
    with pytest.raises(OSError):
        lab.connector.connect_volume(conninfo(uuid=UUID2))
    assert lab.sim.controllers() == ["nvme0", "nvme1"]


def test_all_portals_failing_still_raises_target_unreachable(lab):
    lab.target()
    for port in (4420, 4421):
        lab.sim.portal(NQN, port).mode = "refuse"
    with pytest.raises(TargetUnreachable):
        lab.connector.connect_volume(conninfo())


# -- item 14: per-volume host NQN --------------------------------------------------------------

UUID_NQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-4333-8444-555555555555"
NAMED_NQN = "nqn.2016-06.io.example:compute-7"


def test_per_volume_uuid_host_nqn_connects_with_its_own_host_id(lab):
    lab.target()
    lab.connector.connect_volume(conninfo(host_nqn=UUID_NQN))
    for ctrl in ("nvme0", "nvme1"):
        assert lab.sysfs("class/nvme", ctrl, "hostnqn") == UUID_NQN
        assert lab.sysfs("class/nvme", ctrl, "hostid") == "11111111-2222-4333-8444-555555555555"


def test_per_volume_named_host_nqn_gets_a_stable_name_based_host_id(lab):
    lab.target()
    lab.target(nqn=NQN + "-2", namespaces=((1, UUID2),))
    lab.connector.connect_volume(conninfo(host_nqn=NAMED_NQN))
    lab.new_connector().connect_volume(conninfo(uuid=UUID2, nqn=NQN + "-2",
                                                host_nqn=NAMED_NQN))
    ids = {lab.sysfs("class/nvme", c, "hostid") for c in lab.sim.controllers()}
    assert len(ids) == 1 and HOST_ID not in ids
    assert uuid.UUID(ids.pop()).version == 5


def test_per_volume_host_nqn_never_borrows_the_hosts_own_id(lab):
    lab.target()
    own = "nqn.2014-08.org.nvmexpress:uuid:" + HOST_ID      # uuid form with our host ID
    lab.connector.connect_volume(conninfo(host_nqn=own))
    assert lab.sysfs("class/nvme/nvme0/hostid") != HOST_ID


def test_sim_refuses_a_host_nqn_without_its_own_host_id(lab):
    """The kernel's rule (6.12): one host ID belongs to one host NQN."""
    lab.target()
    reply = lab.sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420",
                             "transport": "tcp", "host_nqn": UUID_NQN})
    assert reply["errno"] == 22 and "found same hostid" in lab.sim.log[-1]
    assert lab.sim.controllers() == []


# -- the privsep daemon died: the next privileged call starts a new one --------------------------

class DeadChannel:
    running = False
    closed = False

    def __init__(self, running=False):
        self.running = running

    def close(self):
        self.closed = True


def test_a_dead_forked_daemon_is_restarted_by_the_next_call(monkeypatch):
    from nvmeof_mp import privileged
    started = []
    dead = DeadChannel()
    monkeypatch.setattr(privileged, "_fork_when_root", True)
    monkeypatch.setattr(privileged.default, "channel", dead)
    monkeypatch.setattr(privileged.default, "start",
                        lambda method: started.append(method) or setattr(
                            privileged.default, "channel", DeadChannel(running=True)))
    privileged.ensure_started()
    assert dead.closed and started == [privileged.priv_context.Method.FORK]
    privileged.ensure_started()                      # running now: nothing more
    assert len(started) == 1


def _children():
    me = str(os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.append(int(pid))
    return out


@pytest.mark.skipif(os.getuid() != 0, reason="forks a real privsep daemon: needs root")
def test_real_forked_daemon_killed_between_calls_is_started_again(monkeypatch):
    """Without a root helper oslo.privsep would restart a dead daemon through sudo and
    privsep-helper (FailedToDropPrivileges on a host without them): we fork a new one."""
    import signal
    import time
    from nvmeof_mp import privileged
    from nvmeof_mp.kernel import PrivilegedKernel
    monkeypatch.setattr(privileged, "_fork_when_root", True)
    kernel = PrivilegedKernel()
    before = set(_children())
    try:
        first = kernel.read_system_uuid()
        [daemon] = set(_children()) - before
        os.kill(daemon, signal.SIGKILL)             # what an OOM kill or a crash does
        os.waitpid(daemon, 0)
        deadline = time.monotonic() + 5
        while privileged.default.channel.running and time.monotonic() < deadline:
            time.sleep(0.01)                        # the channel's reader sees the EOF
        assert kernel.read_system_uuid() == first   # a new daemon, forked again
        assert len(set(_children()) - before) == 1
    finally:
        privileged.default.stop()

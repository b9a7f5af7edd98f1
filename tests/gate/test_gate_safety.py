"""Safe where Nova and Cinder really run it (runs in the lab VM, both gate passes).

Each case runs as the lab user through the root helper and (``root_too``) again in the root
pass, as root without one (the library forks its privsep daemon):

- a fresh process attaches two volumes of one subsystem back to back;
- two greenthreads under ``eventlet.monkey_patch()`` attach volumes of one subsystem;
- a detach with every path dead returns in bounded time and leaves nothing behind;
- the privsep daemon killed in the middle of an attach: the attach fails, leaves nothing,
  and the next attach gets a new daemon.

Whatever could hang runs in a worker process (``gate_worker.py``) or thread with a deadline,
so a hang fails its test instead of the gate.
"""

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_gate import NQN, U1, U2, controllers, info, one_subsystem, portal, record, replicas

from nvmeof_mp.lab.workload import Writer, verify, wait_for

pytestmark = pytest.mark.usefixtures("no_leftovers")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate_worker.py")
#: A fresh process attaching and detaching two volumes took up to 50 s under emulation on a
#: loaded 2-core host (starting the daemon through sudo + rootwrap is most of it).
WORKER_TIMEOUT = 120.0
#: Dead controllers are deleted in well under a second; a detach must not wait for the
#: kernel's ctrl_loss_tmo (10 minutes by default) nor queue behind I/O that cannot complete.
DEAD_DETACH_LIMIT = 30.0
#: A port where nothing answers: TCP connects, the NVMe/TCP ICReq is never answered.
SILENT_PORT = 4430
PRIVSEP_CONTEXT = "nvmeof_mp.privileged.default"


def who():
    return "root, forked daemon" if os.getuid() == 0 else "lab user, root helper"


# ------------------------------------------------------------------------- worker processes

def start_worker(scenario, args):
    before = privsep_daemons()
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")   # eventlet's notice
    proc = subprocess.Popen([sys.executable, WORKER, scenario, json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.daemons_before = before
    return proc


def stop_worker(proc):
    """Kill a worker and its privsep daemon: a daemon forked while the worker held a lock
    holds it too, and would block every later attach of the gate."""
    from nvmeof_mp.lab.agent import TargetClient
    for pid in privsep_daemons(proc.pid, proc.daemons_before):
        TargetClient().kill_process(pid)
    proc.kill()
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        return "", "(no output: the worker's pipes stay open)"


def finish_worker(proc, timeout=WORKER_TIMEOUT):
    """The worker's RESULT; fails the test if it runs past ``timeout`` or fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = stop_worker(proc)
        pytest.fail("worker still running after %ss (%s): hung\nstderr:\n%s"
                    % (timeout, who(), err[-3000:]))
    if proc.returncode != 0:
        pytest.fail("worker failed rc=%s (%s)\nstderr:\n%s"
                    % (proc.returncode, who(), err[-3000:]))
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run_worker(scenario, args, timeout=WORKER_TIMEOUT):
    t = time.monotonic()
    result = finish_worker(start_worker(scenario, args), timeout)
    record("%s (%s): worker %.1fs" % (scenario, who(), time.monotonic() - t))
    return result


# ------------------------------------------------------------------------- (a) and (b)

def two_volumes_of_one_subsystem(target):
    one_subsystem(target, ports=((1, 4420),), namespaces=((1, U1), (2, U2)))
    return [info(U1, ports=(4420,)), info(U2, ports=(4420,))]


def unmap_and_detach(connector, target, paths):
    """The worker detached both volumes; the controller stays while the subsystem shows
    namespaces (by design).  Unmap them as Cinder does, then a detach removes it."""
    target.remove_namespace(NQN, 1)
    target.remove_namespace(NQN, 2)
    assert wait_for(lambda: not any(os.path.exists(p) for p in paths), 30)
    connector.disconnect_volume(info(U1, ports=(4420,)), None)
    assert controllers() == {}


@pytest.mark.cover("fresh process: two volumes of one subsystem back to back", mode="native")
@pytest.mark.root_too
def test_fresh_process_attaches_two_volumes_of_one_subsystem_back_to_back(connector, target):
    """As root the first privileged call forks the daemon: it must not take the subsystem
    lock with it (the second attach would wait for it forever)."""
    infos = two_volumes_of_one_subsystem(target)
    result = run_worker("back_to_back", {"infos": infos})
    assert len(set(result["paths"])) == 2
    unmap_and_detach(connector, target, result["paths"])


@pytest.mark.cover("eventlet greenthreads on one subsystem", mode="native")
@pytest.mark.root_too
def test_eventlet_greenthreads_attach_volumes_of_one_subsystem(connector, target):
    """nova-compute and cinder-volume run under eventlet.monkey_patch(): a greenthread waiting
    for a lock must not stop the hub while the holder waits for the daemon."""
    infos = two_volumes_of_one_subsystem(target)
    result = run_worker("green_pair", {"infos": infos})
    assert len(set(result["paths"])) == 2
    unmap_and_detach(connector, target, result["paths"])


# ------------------------------------------------------------------------- (c)

def bounded(func, limit, what):
    """Run ``func`` in a thread; (seconds, exception or None).  Past ``limit`` the initiator
    is cleaned up (which ends what the thread waits for) and the test fails."""
    box = {}

    def run():
        try:
            func()
        except Exception as e:     # noqa: B902 - the test judges it
            box["error"] = e
        box["seconds"] = time.monotonic() - t

    t = time.monotonic()
    thread = threading.Thread(target=run, daemon=True, name="bounded")
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        from nvmeof_mp.lab.agent import TargetClient
        TargetClient().cleanup_initiator()
        thread.join(30)
        pytest.fail("%s still running after %ss (%s)" % (what, limit, who()))
    return box["seconds"], box.get("error")


def single_case(target):
    one_subsystem(target, ports=((1, 4420),))
    return info(ports=(4420,)), [(1, NQN)]


def native_case(target):
    one_subsystem(target)
    return info(), [(1, NQN), (2, NQN)]


def raid_case(target):
    return ({"volume_replicas": replicas(target), "alias": "gatedead"},
            [(1, NQN + "-a"), (2, NQN + "-b")])


def dm_case(target):
    return ({"vol_uuid": "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
             "dm_replicas": replicas(target, shared_backing=True)},
            [(1, NQN + "-a"), (2, NQN + "-b")])


DEAD_CASES = {"single": single_case, "native": native_case, "raid": raid_case, "dm": dm_case}


def dead(mode):
    return pytest.mark.cover("detach with every path dead: bounded", mode=mode)


@pytest.mark.parametrize("mode,force", [
    pytest.param("single", True, marks=[pytest.mark.root_too, dead("single")]),
    pytest.param("single", False, marks=dead("single")),
    pytest.param("native", True, marks=[pytest.mark.native, pytest.mark.root_too,
                                        dead("native")]),
    pytest.param("native", False, marks=[pytest.mark.native, dead("native")]),
    pytest.param("raid", True, marks=[pytest.mark.root_too, dead("raid")]),
    pytest.param("dm", True, marks=[pytest.mark.root_too, dead("dm")]),
])
def test_detach_with_every_path_dead(connector, target, mode, force):
    volume, links = DEAD_CASES[mode](target)
    result = connector.connect_volume(volume)
    w = Writer(result["path"])
    w.start()
    time.sleep(0.3)
    w.stop()
    assert not w.errors and w.ops > 0 and verify(result["path"], w.expected) == []
    for port, nqn in links:
        target.unlink(port, nqn)
    if not force:
        # may refuse (the data cannot be flushed), but must answer in time
        seconds, error = bounded(lambda: connector.disconnect_volume(volume, result),
                                 DEAD_DETACH_LIMIT, "detach without force, every path dead")
        record("%s detach, every path dead, no force (%s): %.2fs, %s"
               % (mode, who(), seconds, "error: %s" % error if error else "ok"))
        # either outcome must be whole: refused with the volume kept (its queued data is
        # not dropped without force), or done with nothing left
        if error is None:
            assert controllers() == {}, "the detach said done and left controllers"
        else:
            assert controllers(), "refused without force, yet the controllers were deleted"
    seconds, error = bounded(
        lambda: connector.disconnect_volume(volume, result, force=True, ignore_errors=True),
        DEAD_DETACH_LIMIT, "forced detach, every path dead")
    record("%s forced detach, every path dead (%s): %.2fs" % (mode, who(), seconds))
    assert error is None, error
    assert controllers() == {}
    assert not [d for d in os.listdir("/sys/block") if d.startswith(("md", "dm-"))]


# ------------------------------------------------------------------------- (d)

@pytest.fixture
def silent_port():
    """A TCP listener that never answers: an NVMe/TCP connect to it waits for its ICResp."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", SILENT_PORT))
    sock.listen(16)
    yield sock
    sock.close()


def connect_pending(sock):
    """True once a connection waits in the silent port's queue: a portal connect is stuck."""
    return bool(select.select([sock], [], [], 0)[0])


def _proc(pid, name):
    try:
        with open("/proc/%s/%s" % (pid, name), "rb") as f:
            return f.read()
    except OSError:
        return b""


def privsep_daemons(worker_pid=None, before=()):
    """Our privsep daemons: started through privsep-helper (not in ``before``), or forked by
    the worker (a child with the worker's command line)."""
    found = set()
    worker_cmd = _proc(worker_pid, "cmdline") if worker_pid else None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmd = _proc(pid, "cmdline")
        if b"privsep-helper" in cmd and PRIVSEP_CONTEXT.encode() in cmd:
            if int(pid) not in before:
                found.add(int(pid))
        elif worker_pid and cmd == worker_cmd:
            stat = _proc(pid, "stat").rsplit(b")", 1)[-1].split()
            if len(stat) > 1 and int(stat[1]) == worker_pid:
                found.add(int(pid))
    return found


def controllers_of(nqn):
    found = []
    for name in os.listdir("/sys/class/nvme"):
        try:
            with open("/sys/class/nvme/%s/subsysnqn" % name) as f:
                if f.read().strip() == nqn:
                    found.append(name)
        except OSError:
            pass
    return found


def killed_native_case(target, silent):
    one_subsystem(target, ports=((1, 4420),))
    return info(ports=(4420, silent)), NQN


def killed_raid_case(target, silent):
    a = NQN + "-a"
    target.add_subsystem(a)
    target.add_namespace(a, 1, 64, U1)
    target.add_port(1, 4420)
    target.link(1, a)
    return ({"volume_replicas": [{"target_nqn": a, "vol_uuid": U1, "portals": [portal(4420)]},
                                 {"target_nqn": NQN + "-b", "vol_uuid": U2,
                                  "portals": [portal(silent)]}],
             "alias": "gatekill"}, a)


@pytest.mark.root_too
@pytest.mark.parametrize("mode", [
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.cover(
        "privsep daemon killed mid-attach", mode="native")]),
    pytest.param("raid", marks=pytest.mark.cover("privsep daemon killed mid-attach",
                                                 mode="raid"))])
def test_privsep_daemon_killed_mid_attach(target, silent_port, mode):
    """The daemon dies while a portal connect waits: the attach must fail, not hang; the
    controller the dead daemon made for the first portal must not stay behind; the next
    attach must start a new daemon."""
    slow, first_nqn = {"native": killed_native_case, "raid": killed_raid_case}[mode](
        target, SILENT_PORT)
    after_nqn = NQN + "-after"
    target.add_subsystem(after_nqn)
    target.add_namespace(after_nqn, 1, 16, "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d")
    target.link(1, after_nqn)
    after = info("6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d", after_nqn, ports=(4420,))

    proc = start_worker("killed_attach", {"slow": slow, "after": after})
    killed = False
    try:
        # kill while the first portal's controller exists and the silent one is connecting
        made = wait_for(lambda: (controllers_of(first_nqn) and connect_pending(silent_port))
                        or proc.poll() is not None, WORKER_TIMEOUT, interval=0.05)
        assert made and proc.poll() is None, "the attach never got to the silent portal"
        daemons = privsep_daemons(proc.pid, proc.daemons_before)
        assert daemons, "no privsep daemon of the worker found"
        for pid in daemons:
            target.kill_process(pid)
        killed, killed_at = True, time.monotonic()
    finally:
        if not killed and proc.poll() is None:
            stop_worker(proc)
    result = finish_worker(proc)
    record("daemon killed mid-attach, %s (%s): %s" % (mode, who(), json.dumps(result)))
    if mode == "native":
        assert result["slow"].startswith("raised"), result
    else:   # a RAID1 may come up degraded on the leg that made it; it was detached then
        assert result["slow"].startswith(("raised", "attached")), result
    assert result["left"] == [], "left behind by the failed attach: %s" % result["left"]
    assert result["after"] == "ok", "attach after the daemon died: %s" % result["after"]
    assert time.monotonic() - killed_at < WORKER_TIMEOUT

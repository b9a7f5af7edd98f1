"""Cross-process locks: flock per (kind, key), blocking waits, where the lock files live."""

import multiprocessing
import os
import threading

import pytest

from nvmeof_mp import locks

NQN = "nqn.2014-08.org.example:vol"


def _hold_in_child(lock_path, holding, release, log):
    with locks.subsystem_lock(NQN, "host", lock_path):
        holding.set()
        release.wait(10)
        with open(log, "a") as f:
            f.write("child released\n")


def test_another_process_waits_until_the_holder_lets_go(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    log = tmp_path / "log"
    child = ctx.Process(target=_hold_in_child, args=(str(tmp_path), holding, release, log))
    child.start()
    assert holding.wait(10)
    got = threading.Event()

    def take():
        with locks.subsystem_lock(NQN, "host", str(tmp_path)):
            with open(log, "a") as f:
                f.write("parent acquired\n")
            got.set()
    waiter = threading.Thread(target=take)
    waiter.start()
    assert not got.wait(0.2)            # blocked while the child holds it
    release.set()
    assert got.wait(10)
    waiter.join(5)
    child.join(10)
    assert log.read_text().splitlines() == ["child released", "parent acquired"]


def test_threads_of_one_process_exclude_each_other_but_other_keys_do_not(tmp_path):
    inside, overlap = [], []
    other_ran = threading.Event()

    def work():
        with locks.subsystem_lock(NQN, "host", str(tmp_path)):
            inside.append(1)
            overlap.append(len(inside))
            threading.Event().wait(0.02)
            inside.pop()
    with locks.subsystem_lock(NQN, "host", str(tmp_path)):
        workers = [threading.Thread(target=work) for _ in range(4)]
        for w in workers:
            w.start()

        def other():
            with locks.subsystem_lock(NQN + "-2", "host", str(tmp_path)):
                other_ran.set()
        threading.Thread(target=other).start()
        assert other_ran.wait(5)        # another subsystem is not held up
        assert overlap == []            # nobody got in while we hold the lock
    for w in workers:
        w.join(5)
    assert overlap == [1, 1, 1, 1]


def test_lock_is_released_when_the_holder_raises(tmp_path):
    with pytest.raises(ValueError):
        with locks.named_lock("md-vol", str(tmp_path)):
            raise ValueError("boom")
    done = threading.Event()

    def take():
        with locks.named_lock("md-vol", str(tmp_path)):
            done.set()
    threading.Thread(target=take).start()
    assert done.wait(5)


def test_lock_files_are_private_and_keys_do_not_leak_into_names(tmp_path):
    path = locks.lock_file("subsys", "%s|host" % NQN, str(tmp_path / "d"))
    with locks.subsystem_lock(NQN, "host", str(tmp_path / "d")):
        pass
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "example" not in os.path.basename(path)


def test_lock_directory_env_then_oslo_concurrency_then_tempdir(monkeypatch, tmp_path):
    from oslo_concurrency import lockutils
    monkeypatch.delenv("NVMEOF_MP_LOCK_PATH", raising=False)
    lockutils.CONF.set_override("lock_path", None, "oslo_concurrency")
    try:
        assert locks.default_lock_path().endswith("nvmeof_mp-locks-%d" % os.getuid())
        lockutils.CONF.set_override("lock_path", str(tmp_path / "oslo"), "oslo_concurrency")
        assert locks.default_lock_path() == str(tmp_path / "oslo")
        monkeypatch.setenv("NVMEOF_MP_LOCK_PATH", str(tmp_path / "ours"))
        assert locks.default_lock_path() == str(tmp_path / "ours")
    finally:
        lockutils.CONF.clear_override("lock_path", "oslo_concurrency")


def test_without_oslo_concurrency_options_its_environment_variable_still_counts(
        monkeypatch, tmp_path):
    from oslo_config import cfg
    monkeypatch.setattr(cfg, "CONF", cfg.ConfigOpts())     # a process that never imported it
    monkeypatch.delenv("NVMEOF_MP_LOCK_PATH", raising=False)
    monkeypatch.setenv("OSLO_LOCK_PATH", str(tmp_path / "env"))
    assert locks.default_lock_path() == str(tmp_path / "env")
    monkeypatch.delenv("OSLO_LOCK_PATH")
    assert locks.default_lock_path().endswith("nvmeof_mp-locks-%d" % os.getuid())


def test_connector_resolves_its_lock_directory_once(make_lab, monkeypatch, tmp_path):
    monkeypatch.setenv("NVMEOF_MP_LOCK_PATH", str(tmp_path / "first"))
    from nvmeof_mp.connector import NVMeOFConnector
    lab = make_lab()
    connector = NVMeOFConnector(kernel=lab.sim, root=lab.root, clock=lab.sim.clock)
    monkeypatch.setenv("NVMEOF_MP_LOCK_PATH", str(tmp_path / "second"))
    assert connector.lock_path == str(tmp_path / "first")
    assert connector.attacher.lock_path == str(tmp_path / "first")     # attach/detach locks


def test_lock_directory_is_made_again_when_a_temp_cleaner_removed_it(tmp_path):
    directory = tmp_path / "locks"
    with locks.subsystem_lock(NQN, "host", str(directory)):
        pass
    for f in directory.iterdir():
        f.unlink()
    directory.rmdir()
    with locks.subsystem_lock(NQN, "host", str(directory)):
        assert os.stat(directory).st_mode & 0o777 == 0o700


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """oslo.privsep's fork method forks the daemon (no exec) inside whatever lock the first
    privileged call runs under; the daemon lives on, holding every inherited descriptor."""
    with locks.subsystem_lock(NQN, "host", str(tmp_path)):
        pid = os.fork()
        if pid == 0:                    # the "daemon": outlives the holder's lock
            try:
                threading.Event().wait(5)
            finally:
                os._exit(0)
    try:
        got = threading.Event()

        def take():
            with locks.subsystem_lock(NQN, "host", str(tmp_path)):
                got.set()
        threading.Thread(target=take, daemon=True).start()
        assert got.wait(3), "the lock stayed held by a forked child"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


GREEN_SCRIPT = r"""
import eventlet
eventlet.monkey_patch()
import sys, time
from nvmeof_mp import locks
order = []

def attach(name, hold):
    with locks.subsystem_lock("nqn.2014-08.org.example:vol", "host", sys.argv[1]):
        order.append(name + " in")
        time.sleep(hold)          # green: the holder waits on the hub (a socket read, a poll)
        order.append(name + " out")

pool = eventlet.GreenPool()
pool.spawn(attach, "a", 0.3)
eventlet.sleep(0.05)
pool.spawn(attach, "b", 0)
pool.waitall()
print(",".join(order))
"""


def test_greenthreads_under_eventlet_take_turns_instead_of_deadlocking(tmp_path):
    """nova-compute and cinder-volume monkey-patch: a waiter must not block the hub."""
    import subprocess
    import sys
    pytest.importorskip("eventlet")
    try:
        out = subprocess.run([sys.executable, "-c", GREEN_SCRIPT, str(tmp_path)],
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("two greenthreads on one subsystem lock deadlocked")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "a in,a out,b in,b out"


def test_a_lock_directory_another_user_could_tamper_with_is_refused(tmp_path):
    from nvmeof_mp.exception import LockDirectoryError
    shared = tmp_path / "world"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(LockDirectoryError, match="writable by others"):
        with locks.subsystem_lock(NQN, "host", str(shared)):
            pass
    if os.getuid() == 0:                # someone else made the predictable temp path first
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 4242, 4242)
        with pytest.raises(LockDirectoryError, match="owned by uid 4242"):
            with locks.named_lock("md-vol", str(theirs)):
                pass


GREEN_FORK_SCRIPT = r"""
import eventlet
eventlet.monkey_patch()
import os, sys, time
from nvmeof_mp.connector import NVMeOFConnector
log = sys.argv[1]

def busy():                       # another volume's attach, polling in green sleeps
    for _ in range(40):
        with open(log, "a") as f:
            f.write("%d\n" % os.getpid())
        time.sleep(0.02)

conn = NVMeOFConnector(root_helper=None)
pool = eventlet.GreenPool()
pool.spawn(busy)
eventlet.sleep(0.05)
pool.spawn(conn.kernel.read_first_sector, "/dev/nvme0n1")    # the first privileged call
pool.waitall()
time.sleep(0.5)
print(os.getpid())
"""


@pytest.mark.skipif(os.getuid() != 0, reason="a root process without a root helper")
def test_the_daemon_of_a_green_root_process_runs_none_of_its_greenthreads(tmp_path):
    """Under eventlet a forked child keeps every greenthread: the daemon would go on running
    the caller's attaches.  A root process under eventlet starts its daemon fresh instead."""
    import subprocess
    import sys
    pytest.importorskip("eventlet")
    log = tmp_path / "pids"
    out = subprocess.run([sys.executable, "-c", GREEN_FORK_SCRIPT, str(log)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    caller = out.stdout.split()[-1]
    assert set(log.read_text().split()) == {caller}

"""The daemon's tool runs are bounded even when the tool cannot be killed.

A process blocked in the kernel (uninterruptible sleep: a ``dmsetup remove`` of a map whose
I/O is stuck, an ``mdadm`` on a dead leg) outlives SIGKILL until the kernel lets go.
``subprocess.run(timeout=...)`` kills it and then waits for its exit without a limit.  The
simulated tool below is such a process at the boundary the daemon uses (``subprocess.Popen``):
it ignores signals and its exit comes only after the test is over.
"""

import subprocess
import threading
import time

import pytest

from nvmeof_mp.privileged import nvme, storage, tools

STUCK_FOR = 20.0
REAL_POPEN = subprocess.Popen


class StuckTool:
    """A Popen whose process does not go on SIGKILL for STUCK_FOR seconds."""

    started = []

    def __init__(self, argv, **kwargs):
        self.args, self.returncode = argv, None
        self.stdout = self.stderr = None
        self._gone = threading.Event()
        self._holder = REAL_POPEN(["sleep", "60"], start_new_session=True)
        self.pid = self._holder.pid                 # a real group for killpg to hit
        threading.Timer(STUCK_FOR, self._gone.set).start()
        StuckTool.started.append(self)

    def communicate(self, input=None, timeout=None):
        if not self._gone.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.returncode = -9
        return "", ""

    def wait(self, timeout=None):
        self.communicate(timeout=timeout)
        return self.returncode

    def poll(self):
        return self.returncode

    def kill(self):
        pass

    send_signal = terminate = lambda self, *a: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def stuck(monkeypatch):
    monkeypatch.setattr(tools, "GRACE", 0.5)
    monkeypatch.setattr(subprocess, "Popen", StuckTool)
    yield
    for tool in StuckTool.started:
        tool._gone.set()
        tool._holder.kill()
        tool._holder.wait()
    StuckTool.started.clear()


def bounded(call, limit):
    done = threading.Event()
    out = []
    threading.Thread(target=lambda: (out.append(call()), done.set()), daemon=True).start()
    assert done.wait(limit), "the call did not return within %.1f s" % limit
    return out[0]


def test_the_storage_tools_run_is_bounded(stuck):
    result = bounded(lambda: storage._run(["dmsetup", "remove", "x"], timeout=0.3), 3.0)
    assert not result["ok"] and "did not go after SIGKILL" in result["error"], result


def test_nvme_cli_connect_is_bounded(stuck, monkeypatch):
    monkeypatch.setattr(nvme, "CLI_TIMEOUT", 0.3)
    result = bounded(lambda: nvme._connect_cli({"transport": "tcp", "traddr": "::1",
                                                "trsvcid": "4420", "nqn": "nqn.x"}), 3.0)
    assert "did not go after SIGKILL" in result["error"] and not result["already"], result


def test_a_tool_whose_child_holds_its_pipes_is_bounded():
    t = time.monotonic()
    ran = tools.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3, grace=2.0)
    assert time.monotonic() - t < 4.0
    assert ran.timed_out and not ran.ok and ran.returncode is None


def test_a_missing_tool_and_a_quick_one():
    assert tools.run(["/nonexistent/tool"]).missing
    ran = tools.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "out\n", "err\n")

"""Running a tool (mdadm, dmsetup, nvme-cli) from the privsep daemon under a bound that holds.

``subprocess.run(timeout=...)`` kills the tool when the time is up and then waits without a
limit: for EOF on its pipes, which a child the tool started keeps open, and for its exit,
which a process blocked in the kernel (uninterruptible sleep) delays until the kernel lets
go.  Either way the daemon thread and the caller's call hang.  Here the tool runs in its own
process group; at the deadline the whole group gets SIGKILL, and what has not gone ``grace``
seconds later is left to a reaper thread: the call returns, saying so.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading

#: how long a killed tool (and its process group) may take to go before it is left behind
GRACE = 5.0


@dataclasses.dataclass(frozen=True)
class Ran:
    """``returncode`` is None when the tool did not finish (``timed_out``) or is not
    installed (``missing``)."""
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    missing: bool = False
    left_behind: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc):
    try:
        proc.communicate()
    except (OSError, ValueError):
        pass


def run(argv, timeout: float = 120.0, grace: float | None = None) -> Ran:
    """Run ``argv`` (no shell, stdin closed), its output as text; never longer than
    ``timeout`` + ``grace`` (default GRACE) seconds."""
    grace = GRACE if grace is None else grace
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    except FileNotFoundError:
        return Ran(None, missing=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Ran(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
    try:
        out, err = proc.communicate(timeout=grace)
        return Ran(None, out or "", err or "", timed_out=True)
    except subprocess.TimeoutExpired:
        threading.Thread(target=_reap, args=(proc,), name="reap-%d" % proc.pid,
                         daemon=True).start()
        return Ran(None, timed_out=True, left_behind=True)


def describe_timeout(argv, ran: Ran, timeout: float) -> str:
    what = " ".join(str(a) for a in argv[:2])
    if ran.left_behind:
        return ("%s did not finish in %.0f s and did not go after SIGKILL (blocked in the "
                "kernel?): left behind" % (what, timeout))
    return "%s timed out after %.0f s (killed)" % (what, timeout)

"""Guest-side helpers (run as root inside the lab VM; stdlib only).

The guest command starts as root (it owns the nvmet target); the connector under test
should run as the unprivileged lab user, as on a real compute host, and reach root only
through ``$NVMEOF_MP_ROOT_HELPER`` (``sudo <venv>/bin/nvmeof-mp-rootwrap
/etc/nvmeof_mp/rootwrap.conf``).  Use :func:`as_user` / :func:`run_as_user` for that:
they wrap the command in ``runuser -u nvmeof --``, which keeps the environment (PATH with
the venv, NVMEOF_MP_*), so a user process can still reach the target agent.
"""

import contextlib
import glob
import os
import subprocess
import sys
import time

from . import LAB_USER
from .agent import TargetAgent
from .target import Target, two_path_volume

DEFAULT_SOCK = "/run/nvmeof-lab/target.sock"


def lab_user() -> str:
    return os.environ.get("NVMEOF_MP_LAB_USER", LAB_USER)


def as_user(argv, user: str | None = None) -> list:
    """``argv`` rewritten to run as the lab user (root only: runuser needs no password)."""
    return ["runuser", "-u", user or lab_user(), "--", *argv]


def run_as_user(argv, user: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``argv`` as the lab user; kwargs go to ``subprocess.run``."""
    return subprocess.run(as_user(argv, user), **kwargs)


@contextlib.contextmanager
def target_session(sock_path: str | None = None):
    """A fresh :class:`Target` served by a :class:`TargetAgent`; torn down on exit.

    Exports ``NVMEOF_MP_TARGET_SOCK`` so child processes (any user) find the agent.
    """
    sock_path = sock_path or os.environ.get("NVMEOF_MP_TARGET_SOCK") or DEFAULT_SOCK
    target = Target()
    agent = TargetAgent(target, sock_path).start()
    os.environ["NVMEOF_MP_TARGET_SOCK"] = sock_path
    try:
        yield target
    finally:
        agent.stop()
        with contextlib.suppress(OSError):
            target.teardown()


def guest_run(argv, *, user: bool = False) -> int:
    """Run ``argv`` (as root, or as the lab user) with the target agent up; its exit code."""
    with target_session():
        cmd = as_user(argv) if user else list(argv)
        try:
            return subprocess.run(cmd).returncode
        except FileNotFoundError as exc:
            print(f"guest-run: {exc}", file=sys.stderr)
            return 127


# ---------------------------------------------------------------- gate

#: Marker of the gate tests that run a second time as root without a root helper.
ROOT_MARKER = "root_too"


def gate_passes(pytest_argv, extra_args=(), passes=("user", "root"), only=None) -> int:
    """The gate suite in this VM: as the lab user through the root helper (as deployed with
    sudo + rootwrap), then the ``root_too`` tests as root with no root helper, where the
    library forks its privsep daemon.  One target agent serves both passes.

    ``pytest_argv`` is the pytest command without ``-m``, ``extra_args`` the caller's pytest
    options (a ``-m`` there wins).  A pass that selects nothing (pytest exit code 5) does not
    fail the gate unless every pass selects nothing.  Each pass's exit code and time go to
    ``gate-passes.txt`` in the result share.  ``only`` (a marker expression such as
    ``smoke``) narrows both passes; a pass named ``root:smoke`` is narrowed by the
    expression after its colon alone.
    """
    out = os.environ.get("NVMEOF_MP_LAB_OUT")
    rcs = {}
    with target_session():
        for spec in passes:
            name, _, narrow = spec.partition(":")
            marker = "gate" if name == "user" else "gate and " + ROOT_MARKER
            for expression in filter(None, (only, narrow)):
                marker += f" and ({expression})"
            cmd = [*pytest_argv, "-m", marker, *extra_args]
            if name == "user":
                cmd = as_user(cmd)
            print(f"gate: {name} pass: -m {marker!r}", flush=True)
            t = time.monotonic()
            rcs[spec] = subprocess.run(cmd).returncode
            line = (f"gate: {spec} pass rc={rcs[spec]} in {time.monotonic() - t:.1f}s"
                    f" (kernel {os.uname().release})")
            print(line, flush=True)
            if out:
                with open(os.path.join(out, "gate-passes.txt"), "a") as f:
                    f.write(line + "\n")
    if all(rc == 5 for rc in rcs.values()):
        return 5
    return next((rc for rc in rcs.values() if rc not in (0, 5)), 0)


# ---------------------------------------------------------------- smoke

SMOKE_NQN = "nqn.2014-08.org.nvmeof-mp:lab-smoke"
SMOKE_UUID = "5b0b6f6e-3c1d-4d2e-9f10-2a3b4c5d6e7f"


class _Steps:
    """Prints each step with its duration; remembers failures of required steps."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.failed: list[str] = []

    @contextlib.contextmanager
    def step(self, name: str, required: bool = True):
        t = time.monotonic()
        try:
            yield
            status = "ok"
        except Exception as exc:  # report and go on: a smoke run should show everything
            status = f"FAILED: {type(exc).__name__}: {exc}"
            if required:
                self.failed.append(name)
        print(f"smoke: [{time.monotonic() - self.t0:6.2f}s] {name}: {status} "
              f"({time.monotonic() - t:.2f}s)", flush=True)


def _sh(argv, user: bool = False, check: bool = True, lines: int = 40) -> str:
    proc = subprocess.run(as_user(argv) if user else argv, text=True, capture_output=True,
                          timeout=120)
    out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[:lines])
    print(f"    $ {' '.join(argv)}  (rc={proc.returncode})", flush=True)
    if out:
        print("    " + out.replace("\n", "\n    "), flush=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return out


def _wait_for(pattern: str, seconds: float) -> list:
    end = time.monotonic() + seconds
    while not (found := sorted(glob.glob(pattern))) and time.monotonic() < end:
        time.sleep(0.1)
    if not found:
        raise RuntimeError(f"nothing matches {pattern} after {seconds}s")
    return found


def _attr(ctrl: str, name: str) -> str | None:
    with contextlib.suppress(OSError):
        with open(os.path.join(ctrl, name)) as f:
            return f.read().strip().replace("\n", " ")
    return None


def _controllers() -> str:
    return "\n".join(
        f"{os.path.basename(c)} state={_attr(c, 'state')} address={_attr(c, 'address')} "
        f"subsys={_attr(c, 'subsysnqn')}" for c in sorted(glob.glob("/sys/class/nvme/nvme*")))


def smoke() -> int:
    """Target with 1 subsystem/64 MiB namespace on ports 4420+4421; user + sudo; connect."""
    steps = _Steps()
    helper = os.environ.get("NVMEOF_MP_ROOT_HELPER", "")
    py = sys.executable
    with target_session() as target:
        with steps.step("nvmet target: subsystem, 64 MiB namespace, ports 4420/4421"):
            two_path_volume(target, SMOKE_NQN, SMOKE_UUID)
        with steps.step(f"{lab_user()} may sudo the root helper (sudo -n -l)"):
            _sh(["sudo", "-n", "-l", *helper.split()[1:], "privsep-helper"], user=True)
        with steps.step("root helper runs rootwrap (informational)", required=False):
            _sh([*helper.split(), "privsep-helper", "--help"], user=True, check=False, lines=1)
        with steps.step(f"{lab_user()} reaches the target agent (python startup in guest)"):
            _sh([py, "-c", "from nvmeof_mp.lab.agent import TargetClient as C; "
                 "print(C().state())"], user=True)
        for svc in (4420, 4421):
            with steps.step(f"nvme connect port {svc}"):
                _sh(["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", str(svc),
                     "-n", SMOKE_NQN, "-l", "30"])
        with steps.step("block device appears"):
            _wait_for("/dev/nvme*n1", 10)
            time.sleep(0.5)
            print("    " + _controllers().replace("\n", "\n    "))
            print("    " + " ".join(sorted(glob.glob("/dev/nvme*"))), flush=True)
        with steps.step("nvme list-subsys", required=False):
            _sh(["nvme", "list-subsys"])
        with steps.step("nvme disconnect"):
            _sh(["nvme", "disconnect", "-n", SMOKE_NQN])
    print(f"smoke: total in guest {time.monotonic() - steps.t0:.2f}s; "
          f"{'FAILED: ' + ', '.join(steps.failed) if steps.failed else 'all required ok'}",
          flush=True)
    return 1 if steps.failed else 0

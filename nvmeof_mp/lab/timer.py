"""A stand-in for systemd that runs nvmeof-mp-heal.timer where systemd is not PID 1 (stdlib only).

The lab VM's PID 1 is ``guest-init.sh``, so nothing would start the heal timer there.  This
runner reads the unit files as installed (``etc/systemd/`` of the checkout, which the VM sees at
the same path): the timer's ``OnBootSec``/``OnUnitActiveSec``, the service's ``ExecStart``,
``User``, ``Environment`` and ``TimeoutStartSec``, and runs ``ExecStart`` on that schedule in a
background thread, writing each run's output, exit status and duration to a log file.

As systemd does for a ``Type=oneshot`` service, it never runs two heals at once (one thread
runs them one after the other; a tick during a run starts nothing, and the next run waits
for the next tick), kills a heal that outlives
``TimeoutStartSec`` (its whole process group), and counts ``OnUnitActiveSec`` from the last
run's start.  A unit key the runner does not know is refused, so a unit cannot silently mean
more than the lab runs; hardening keys are known but not emulated.  A gate test may shorten
the period (``period_override``); the log says so.

Gate use::

    with timer.running(period_override=2, log=out / "heal-timer.log") as heals:
        ...break a path...
        heals.wait_for_runs(heals.count + 2, timeout=60)

Command line (e.g. in ``nvmeof-mp lab shell``)::

    python -m nvmeof_mp.lab.timer [--unit-dir DIR] [--period S] [--runs N] [--log FILE]
"""

import argparse
import contextlib
import dataclasses
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TIMER = "nvmeof-mp-heal.timer"
#: systemd's exit status of a service whose program could not be executed (203/EXEC)
EXIT_EXEC = 203
#: where systemd looks up an ExecStart program given without a path
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: keys the runner honours
HONOURED = {
    "timer": {"Timer": {"OnBootSec", "OnUnitActiveSec", "Unit"}},
    "service": {"Service": {"Type", "ExecStart", "User", "Environment", "TimeoutStartSec",
                            "TimeoutStopSec"}},
}
#: keys it knows and deliberately leaves to systemd (ordering, install, sandboxing)
NOT_EMULATED = {
    "Unit": {"Description", "Documentation", "After", "Wants"},
    "Install": {"WantedBy"},
    "Timer": {"AccuracySec"},
    "Service": {"CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem", "ReadWritePaths",
                "ProtectHome", "PrivateTmp", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
                "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures"},
}


def _known(kind):
    sections = {"Unit": NOT_EMULATED["Unit"], "Install": NOT_EMULATED["Install"]}
    for section, keys in HONOURED[kind].items():
        sections[section] = keys | NOT_EMULATED.get(section, set())
    return sections


#: unit kind ("timer", "service") -> section -> every key the runner knows
KNOWN_KEYS = {kind: _known(kind) for kind in HONOURED}


class UnitError(Exception):
    """A unit the runner cannot read or cannot honour."""


# ---------------------------------------------------------------- parsing

_UNITS = {
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
    "M": 2629800, "month": 2629800, "months": 2629800,
    "y": 31557600, "year": 31557600, "years": 31557600,
}
_SPAN_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-zµ]*)\s*")


def parse_timespan(text: str) -> float:
    """Seconds in a systemd time span: "15s", "1min 30s", "500ms", "2 min", "15" (seconds),
    "infinity"."""
    text = text.strip()
    if text == "infinity":
        return float("inf")
    if not text:
        raise UnitError("empty time span")
    total, pos = 0.0, 0
    while pos < len(text):
        m = _SPAN_PART.match(text, pos)
        if not m or m.end() == pos or m.group(2) not in _UNITS and m.group(2):
            raise UnitError(f"bad time span {text!r}")
        total += float(m.group(1)) * _UNITS.get(m.group(2), 1)
        pos = m.end()
    return total


def parse_unit(path, sections: dict | None = None) -> dict:
    """``{section: {key: [value, ...]}}`` of a unit file, values in file order (comments,
    blank lines and backslash continuations handled as systemd does).  With ``sections``
    (what earlier files said), the file's values are added after those: a drop-in."""
    sections = {} if sections is None else sections
    current = None
    with open(path) as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise UnitError(f"{path}: cannot read line {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        current.setdefault(key, []).append(value)
    return sections


def _check_keys(path, unit, kind):
    for section, keys in unit.items():
        known = KNOWN_KEYS[kind].get(section)
        if known is None:
            raise UnitError(f"{path}: section [{section}] is unknown to the lab runner")
        unknown = sorted(set(keys) - known)
        if unknown:
            raise UnitError(f"{path}: [{section}] {', '.join(unknown)}: unknown to the lab runner")


def _last(unit, section, key, default=None):
    values = unit.get(section, {}).get(key)
    return values[-1] if values else default


def _environment(values) -> dict:
    env: dict = {}
    for value in values:
        if not value:  # an empty assignment resets the list
            env.clear()
            continue
        for item in shlex.split(value):
            if "=" not in item:
                raise UnitError(f"bad Environment= item {item!r}")
            name, val = item.split("=", 1)
            env[name] = val
    return env


def _read(path: Path, kind: str) -> dict:
    """The unit and its drop-ins (``<unit>.d/*.conf`` beside it, in name order), checked."""
    unit = parse_unit(path)
    _check_keys(path, unit, kind)
    for conf in sorted(path.parent.glob(path.name + ".d/*.conf")):
        _check_keys(conf, parse_unit(conf), kind)
        parse_unit(conf, unit)
    return unit


def _exec_start(values) -> list:
    if "" in values:  # an empty ExecStart= (as in a drop-in) clears those before it
        values = values[len(values) - values[::-1].index(""):]
    if len(values) != 1:
        raise UnitError("the lab runner needs exactly one ExecStart= line")
    value = values[0]
    if value[0] in "-@+!:":
        raise UnitError(f"ExecStart prefix {value[0]!r} is not supported by the lab runner")
    if "$" in value or "%" in value:
        raise UnitError("ExecStart variables and specifiers are not supported by the lab runner")
    return shlex.split(value)


@dataclasses.dataclass(frozen=True)
class Job:
    """What the timer and its service ask for."""

    timer_path: str
    service_path: str
    argv: list
    user: str | None
    environment: dict
    #: TimeoutStartSec in seconds; None: no limit
    timeout: float | None
    #: TimeoutStopSec: grace between SIGTERM and SIGKILL of a timed-out run
    stop_timeout: float
    on_boot: float
    period: float


def default_unit_dir() -> Path:
    """``etc/systemd`` of this checkout: the unit files as shipped (and, in the lab VM, at the
    same path, since the guest's root is the host's)."""
    return Path(__file__).resolve().parents[2] / "etc" / "systemd"


#: the shipped udev rule that starts the heal service when dm fails a path of ours
UDEV_RULE = "69-nvmeof-mp-dm-heal.rules"
#: its action; the lab has no systemd as PID 1 and replaces it (:func:`udev_rule`)
SYSTEMCTL_START = 'RUN+="/bin/systemctl --no-block start nvmeof-mp-heal.service"'


def default_rules_dir() -> Path:
    """``etc/udev/rules.d`` of this checkout: the rules as shipped."""
    return Path(__file__).resolve().parents[2] / "etc" / "udev" / "rules.d"


def udev_rule(trigger: str, rules_dir=None) -> str:
    """The shipped rule with its ``systemctl start`` of the heal service replaced by creating
    ``trigger`` (which a runner with that ``trigger`` takes as the start): the same matches,
    so the lab proves the rule's own conditions.  Refuses a rule of another shape."""
    path = Path(rules_dir or default_rules_dir()) / UDEV_RULE
    rules = [line for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if len(rules) != 1 or rules[0].count(SYSTEMCTL_START) != 1 or rules[0].count("RUN") != 1:
        raise UnitError(f"{path}: expected one rule whose one action is {SYSTEMCTL_START}")
    return rules[0].replace(SYSTEMCTL_START, f'RUN+="/bin/touch {trigger}"') + "\n"


@contextlib.contextmanager
def udev_rule_installed(trigger: str, dest: str = "/etc/udev/rules.d"):
    """:func:`udev_rule` in ``dest`` (the lab VM's own /etc) while the block runs."""
    path = Path(dest) / UDEV_RULE
    path.write_text(udev_rule(trigger))
    subprocess.run(["udevadm", "control", "--reload"], capture_output=True, timeout=30)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], capture_output=True, timeout=30)


def _seconds(value, default):
    if value is None:
        return default
    seconds = parse_timespan(value)
    return None if seconds in (0, float("inf")) else seconds


def load(unit_dir=None, timer: str = TIMER) -> Job:
    """Read ``timer`` and the service it starts from ``unit_dir`` (with their drop-ins there);
    refuse what the runner cannot honour."""
    unit_dir = Path(unit_dir or default_unit_dir())
    timer_path = unit_dir / timer
    tunit = _read(timer_path, "timer")
    service = _last(tunit, "Timer", "Unit", timer.rsplit(".", 1)[0] + ".service")
    service_path = unit_dir / service
    sunit = _read(service_path, "service")
    if _last(sunit, "Service", "Type", "simple") != "oneshot":
        raise UnitError(f"{service_path}: the lab runner runs only Type=oneshot services")
    period = _last(tunit, "Timer", "OnUnitActiveSec")
    if period is None or parse_timespan(period) <= 0:
        raise UnitError(f"{timer_path}: needs OnUnitActiveSec=")
    if _last(tunit, "Timer", "OnBootSec") is None:
        # systemd counts OnUnitActiveSec= from the service's last start: without another
        # trigger the service never starts and the timer never elapses.
        raise UnitError(f"{timer_path}: needs OnBootSec= (OnUnitActiveSec= alone never fires)")
    return Job(
        timer_path=str(timer_path), service_path=str(service_path),
        argv=_exec_start(sunit.get("Service", {}).get("ExecStart", [])),
        user=_last(sunit, "Service", "User"),
        environment=_environment(sunit.get("Service", {}).get("Environment", [])),
        timeout=_seconds(_last(sunit, "Service", "TimeoutStartSec"), 90.0),
        stop_timeout=_seconds(_last(sunit, "Service", "TimeoutStopSec"), 90.0) or 90.0,
        on_boot=parse_timespan(_last(tunit, "Timer", "OnBootSec")),
        period=parse_timespan(period),
    )


# ---------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Run:
    number: int
    #: time.monotonic() at the start
    started: float
    duration: float
    #: exit status; negative: killed by that signal; EXIT_EXEC: program not executable
    returncode: int
    timed_out: bool = False


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("inf")


_ACTIVE: set = set()
_ACTIVE_LOCK = threading.Lock()


class TimerRunner:
    """Runs ``job.argv`` on the timer's schedule in a background thread; see the module doc."""

    def __init__(self, job: Job, log, period_override: float | None = None,
                 env: dict | None = None, first_delay: float | None = None,
                 trigger: str | None = None):
        if period_override is not None and period_override <= 0:
            raise ValueError("period_override must be positive")
        self.job = job
        self.log_path = str(log)
        self.period = period_override if period_override is not None else job.period
        self.period_override = period_override
        self.extra_env = dict(env or {})
        self.first_delay = first_delay
        self._runs: list = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()      # stop, or a start request
        self._kill = threading.Event()
        self.trigger = trigger
        self._proc = None
        self._thread = None
        self._key = os.path.realpath(job.service_path)

    # -- public API

    @property
    def runs(self) -> list:
        """Finished runs, oldest first."""
        with self._cond:
            return list(self._runs)

    @property
    def count(self) -> int:
        with self._cond:
            return len(self._runs)

    @property
    def busy(self) -> bool:
        """A heal is running now."""
        with self._cond:
            return self._proc is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for_runs(self, count: int, timeout: float) -> list:
        """The finished runs once there are at least ``count`` (or when ``timeout`` passes,
        whatever there is then)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._runs) >= count, timeout)
            return list(self._runs)

    def wait_until_busy(self, timeout: float) -> bool:
        """True once a heal is running (False if none started within ``timeout``)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._proc is not None, timeout)

    def start_now(self, why: str = "start requested") -> None:
        """``systemctl --no-block start`` of the service: a heal now, unless one is running
        (a oneshot being started joins that run: nothing more starts)."""
        with self._cond:
            if self._proc is not None:
                self._log(f"{why}: joins the running heal")
                return
        self._log(f"{why}: heal now")
        self._wake.set()

    def _watch_trigger(self) -> None:
        """The lab's stand-in for systemctl in udev rules: the file appearing is a start."""
        while not self._stop.wait(0.1):
            try:
                os.unlink(self.trigger)
            except FileNotFoundError:
                continue
            self.start_now(f"{os.path.basename(self.trigger)} (udev)")

    def start(self) -> "TimerRunner":
        self._spawn_args()  # refuse an impossible User= before anything runs
        with _ACTIVE_LOCK:
            if self._key in _ACTIVE:
                raise UnitError(f"{self.job.service_path} is already run by a lab timer")
            _ACTIVE.add(self._key)
        first = self.first_delay
        if first is None:
            first = max(0.0, self.job.on_boot - _uptime())
            if self.period_override is not None:
                first = min(first, self.period_override)
        name = os.path.basename(self.job.timer_path)
        if self.period_override is not None:
            how = (f"period {self.period:g}s: override by the caller (the unit says "
                   f"OnUnitActiveSec={self.job.period:g}s)")
        else:
            how = f"period {self.period:g}s (OnUnitActiveSec)"
        self._log(f"{name}: {how}; first run in {first:.1f}s; "
                  f"ExecStart={shlex.join(self.job.argv)} User={self.job.user or '-'} "
                  f"TimeoutStartSec={self.job.timeout}")
        self._thread = threading.Thread(target=self._loop, args=(first,),
                                        name="lab-heal-timer", daemon=True)
        self._thread.start()
        if self.trigger:
            threading.Thread(target=self._watch_trigger, name="lab-heal-trigger",
                             daemon=True).start()
        return self

    def stop(self, kill: bool = False) -> None:
        """No more runs; a heal still running finishes (bounded by TimeoutStartSec), or with
        ``kill`` is terminated at once.  Returns when the runner's thread has ended."""
        self._stop.set()
        self._wake.set()
        if kill:
            self._kill.set()
        try:
            if self._thread is not None:
                self._thread.join()
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self._key)
        self._log(f"stopped after {self.count} run(s)")

    # -- internals

    def _log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with open(self.log_path, "a") as f:
            f.write(f"{stamp}Z lab-timer: {line}\n")

    def _loop(self, first: float) -> None:
        next_at = time.monotonic() + first
        while True:
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            if self._stop.is_set():
                break
            self._wake.clear()
            started = time.monotonic()
            self._run_once(started)
            next_at = started + self.period
            # As systemd: a tick while the oneshot still runs joins that run (no second
            # heal, none queued), and the next one is a period after that tick.
            late = time.monotonic() - next_at
            if late >= 0:
                ticks = int(late // self.period) + 1
                next_at += ticks * self.period
                self._log(f"{ticks} tick(s) during run {self.count}: nothing started")

    def _spawn_args(self) -> dict:
        """Environment and identity for the run, as systemd would set them."""
        env = {"PATH": os.environ.get("PATH", SYSTEMD_PATH),
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        kwargs: dict = {}
        user = self.job.user
        if user is not None:
            try:
                pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
            except KeyError:
                raise UnitError(f"User={user}: no such user") from None
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell)
            if pw.pw_uid != os.getuid():
                if os.getuid() != 0:
                    raise UnitError(f"User={user}: the lab runner must run as root to switch "
                                    "user")
                kwargs.update(user=pw.pw_uid, group=pw.pw_gid,
                              extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid))
        env.update(self.job.environment)
        env.update(self.extra_env)
        return {"env": env, **kwargs}

    def _resolve(self, env) -> str | None:
        prog = self.job.argv[0]
        if os.path.isabs(prog):
            return prog if os.access(prog, os.X_OK) else None
        return shutil.which(prog, path=env["PATH"] + os.pathsep + SYSTEMD_PATH)

    def _run_once(self, started: float) -> None:
        number = self.count + 1
        kwargs = self._spawn_args()
        exe = self._resolve(kwargs["env"])
        timed_out = False
        self._log(f"run {number}: {shlex.join(self.job.argv)}")
        if exe is None:
            self._log(f"run {number}: {self.job.argv[0]}: not found or not executable")
            rc = EXIT_EXEC
        else:
            with open(self.log_path, "ab") as out:
                try:
                    proc = subprocess.Popen([exe, *self.job.argv[1:]], stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, cwd="/",
                                            start_new_session=True, **kwargs)
                except OSError as exc:
                    self._log(f"run {number}: cannot execute: {exc}")
                    proc = None
                    rc = EXIT_EXEC
            if proc is not None:
                with self._cond:
                    self._proc = proc
                    self._cond.notify_all()
                try:
                    rc, timed_out = self._wait(proc, started)
                finally:
                    with self._cond:
                        self._proc = None
        duration = time.monotonic() - started
        verdict = "timed out (TimeoutStartSec), killed" if timed_out else "exit"
        self._log(f"run {number}: {verdict} {rc} in {duration:.2f}s")
        with self._cond:
            self._runs.append(Run(number, started, duration, rc, timed_out))
            self._cond.notify_all()

    def _wait(self, proc, started: float) -> tuple:
        """(returncode, timed_out): waits for the run, its timeout, or a stop with kill."""
        deadline = started + self.job.timeout if self.job.timeout else None
        while True:
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            try:
                return proc.wait(timeout=max(0.0, left)), False
            except subprocess.TimeoutExpired:
                pass
            if self._kill.is_set():
                return self._terminate(proc), False
            if deadline is not None and time.monotonic() >= deadline:
                return self._terminate(proc), True

    def _terminate(self, proc) -> int:
        """SIGTERM to the run's process group, SIGKILL after TimeoutStopSec (systemd's
        KillMode=control-group)."""
        for sig, grace in ((signal.SIGTERM, self.job.stop_timeout), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                return proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return proc.returncode


def _default_log() -> str:
    out = os.environ.get("NVMEOF_MP_LAB_OUT") or tempfile.gettempdir()
    return os.path.join(out, "nvmeof-mp-heal-timer.log")


@contextlib.contextmanager
def running(unit_dir=None, *, period_override: float | None = None, log=None,
            timer: str = TIMER, env: dict | None = None, first_delay: float | None = None,
            kill_on_exit: bool = False, trigger: str | None = None):
    """The timer running in the background for the ``with`` block; stopped on exit (a heal
    still running finishes first unless ``kill_on_exit``).  Yields the :class:`TimerRunner`.

    ``unit_dir``: where the units are (default :func:`default_unit_dir`); ``period_override``:
    seconds between runs instead of ``OnUnitActiveSec`` (also caps the first delay);
    ``log``: the log file (default ``$NVMEOF_MP_LAB_OUT/nvmeof-mp-heal-timer.log``);
    ``env``: added to the service's environment (e.g. ``NVMEOF_MP_LOCK_PATH``);
    ``first_delay``: seconds before the first run instead of what ``OnBootSec`` leaves;
    ``trigger``: a file whose appearance starts a heal now (``start_now``), what the lab's
    copy of the udev rule creates instead of calling systemctl (:func:`udev_rule`).
    """
    runner = TimerRunner(load(unit_dir, timer), log or _default_log(),
                         period_override=period_override, env=env, first_delay=first_delay,
                         trigger=trigger)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop(kill=kill_on_exit)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nvmeof_mp.lab.timer", description=__doc__
                                .split("\n\n")[0])
    p.add_argument("--unit-dir", default=None, help="default: the checkout's etc/systemd")
    p.add_argument("--period", type=parse_timespan, default=None,
                   help="override OnUnitActiveSec (systemd time span)")
    p.add_argument("--runs", type=int, default=0, help="stop after N runs (0: until signalled)")
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with running(args.unit_dir, period_override=args.period, log=args.log) as runner:
        print(f"lab-timer: logging to {runner.log_path}", flush=True)
        while not stop.wait(0.2):
            if args.runs and runner.count >= args.runs:
                break
    runs = runner.runs
    for run in runs:
        print(f"lab-timer: run {run.number}: rc={run.returncode} {run.duration:.2f}s"
              f"{' (timed out)' if run.timed_out else ''}")
    return 0 if runs and all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

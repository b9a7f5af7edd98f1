"""etc/systemd/nvmeof-mp-heal.{service,timer} and the lab's stand-in for systemd that runs them.

The units are checked as systemd would read them (``systemd-analyze verify`` when the tool is
installed) and as the lab runner reads them: every key is one the runner knows, the service
runs ``nvmeof-mp heal --all`` as root under a timeout, the timer fires on a short period.
The runner is exercised with stand-in commands: periodic runs, no overlap, timeouts, stop.
"""

import itertools
import os
import pwd
import re
import shutil
import subprocess
import sys
import time

import pytest

from nvmeof_mp.lab import timer

UNITS = os.path.join(os.path.dirname(__file__), "..", "etc", "systemd")
SERVICE = "nvmeof-mp-heal.service"
TIMER = "nvmeof-mp-heal.timer"
#: generous deadlines for waiting on a background thread; a pass takes a fraction of them
DEADLINE = 20.0


# ---------------------------------------------------------------- the units


@pytest.mark.parametrize("name", [SERVICE, TIMER])
def test_every_key_of_the_units_is_known_to_the_runner(name):
    unit = timer.parse_unit(os.path.join(UNITS, name))
    assert unit, "empty unit"
    kind = name.rsplit(".", 1)[1]
    for section, keys in unit.items():
        known = timer.KNOWN_KEYS[kind].get(section)
        assert known is not None, f"{name}: section [{section}] unknown to the runner"
        assert set(keys) <= known, f"{name} [{section}]: {sorted(set(keys) - known)}"


def test_the_service_runs_heal_all_as_root_with_a_timeout():
    job = timer.load(UNITS)
    assert os.path.basename(job.argv[0]) == "nvmeof-mp"
    assert job.argv[1:] == ["heal", "--all"]
    assert job.user == "root"
    assert job.timeout is not None and 0 < job.timeout <= 600


def test_the_service_is_a_oneshot_and_holds_no_secret():
    unit = timer.parse_unit(os.path.join(UNITS, SERVICE))
    assert unit["Service"]["Type"] == ["oneshot"]
    values = " ".join(v for keys in unit.values() for vs in keys.values() for v in vs).lower()
    for word in ("dhchap", "dhhc-1", "secret", "password"):
        assert word not in values


#: sandboxing that would stop a heal from working, and why
BREAKS_HEAL = {
    "PrivateDevices": "hides /dev/nvme-fabrics, /dev/md*, /dev/mapper/control",
    "DevicePolicy": "a device ACL: block and fabrics devices are not in it",
    "DeviceAllow": "any entry closes every device not listed",
    "ProtectClock": "implies DeviceAllow=char-rtc, which closes every other device on "
                    "older systemd (systemd issue 18142, fixed in 2022)",
    "ProtectKernelTunables": "makes /sys read-only: no controller delete, no md/dm state",
    "PrivateNetwork": "the kernel's fabrics connections belong to the host's network",
    "PrivateUsers": "no real root, no CAP_SYS_ADMIN over devices",
    "MemoryDenyWriteExecute": "breaks libffi closures (cffi, ctypes callbacks)",
}


@pytest.mark.parametrize("key", sorted(BREAKS_HEAL))
def test_the_service_has_no_sandboxing_that_breaks_a_heal(key):
    unit = timer.parse_unit(os.path.join(UNITS, SERVICE))
    values = unit["Service"].get(key, [])
    assert not values or values[-1] in ("no", "false", "off", ""), BREAKS_HEAL[key]


def test_the_capability_bounding_set_keeps_what_the_privsep_daemon_needs():
    """oslo.privsep's daemon capsets itself to the context's capabilities: one missing from
    the bounding set and the daemon cannot start."""
    from nvmeof_mp import privileged
    from oslo_privsep import capabilities as caps
    unit = timer.parse_unit(os.path.join(UNITS, SERVICE))
    bounding = set(" ".join(unit["Service"]["CapabilityBoundingSet"]).split())
    names = {getattr(caps, n): n for n in dir(caps) if n.startswith("CAP_")}
    assert {names[c] for c in privileged.default.conf.capabilities} <= bounding


def test_the_timer_fires_on_a_short_period_with_little_slack():
    job = timer.load(UNITS)
    assert 1 <= job.period <= 60
    assert 0 <= job.on_boot <= 120
    unit = timer.parse_unit(os.path.join(UNITS, TIMER))
    assert timer.parse_timespan(unit["Timer"]["AccuracySec"][-1]) <= 1
    assert unit["Install"]["WantedBy"] == ["timers.target"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"),
                    reason="systemd-analyze is not installed: units not verified by systemd")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """``systemd-analyze verify`` also checks that ExecStart's program exists; it resolves
    ``nvmeof-mp`` in systemd's fixed search path, where a development machine has none, so the
    copy verified here names this venv's ``nvmeof-mp`` by its absolute path."""
    exe = shutil.which("nvmeof-mp", path=os.path.dirname(sys.executable)) or sys.executable
    for name in (SERVICE, TIMER):
        with open(os.path.join(UNITS, name)) as f:
            text = f.read()
        if name == SERVICE:
            assert "\nExecStart=nvmeof-mp heal --all\n" in text
            text = text.replace("\nExecStart=nvmeof-mp ", f"\nExecStart={exe} ")
        (tmp_path / name).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          str(tmp_path / TIMER), str(tmp_path / SERVICE)],
                         capture_output=True, text=True, timeout=60)
    # Without systemd as PID 1 it still parses; it may only grumble about the missing manager.
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if "nvmeof-mp-heal" in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def test_the_default_unit_dir_is_the_checkouts_etc_systemd():
    assert os.path.samefile(timer.default_unit_dir(), UNITS)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, seconds", [
    ("15s", 15), ("15", 15), ("1min", 60), ("500ms", 0.5), ("1min 30s", 90), ("2 min", 120),
    ("1h", 3600), ("1.5s", 1.5), ("250msec", 0.25), ("3sec", 3), ("10us", 0.00001),
    ("1d", 86400), ("1w", 604800), ("0", 0), ("infinity", float("inf")), ("2m", 120),
])
def test_timespans_parse_as_systemd_reads_them(text, seconds):
    assert timer.parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "15 parsecs", "-5s", "1min foo", "1.2.3s"])
def test_bad_timespans_are_refused(text):
    with pytest.raises(timer.UnitError):
        timer.parse_timespan(text)


def test_parse_unit_keeps_repeated_keys_comments_and_continuations(tmp_path):
    path = tmp_path / "x.service"
    path.write_text("# comment\n; other comment\n[Service]\nEnvironment=A=1\n"
                    "Environment=\"B=two words\" C=3\nExecStart=/bin/echo \\\n  one two\n\n")
    unit = timer.parse_unit(str(path))
    assert unit["Service"]["Environment"] == ["A=1", "\"B=two words\" C=3"]
    assert unit["Service"]["ExecStart"] == ["/bin/echo one two"]


# ---------------------------------------------------------------- the runner


def write_units(unit_dir, exec_start, *, service_extra="", timer_extra="", period="15s"):
    """A copy of the real timer (with ``period``) and a oneshot service running a stand-in."""
    unit_dir.mkdir(exist_ok=True)
    with open(os.path.join(UNITS, TIMER)) as f:
        text = f.read()
    lines = [f"OnUnitActiveSec={period}" if line.startswith("OnUnitActiveSec=") else line
             for line in text.splitlines()]
    (unit_dir / TIMER).write_text("\n".join(lines) + "\n" + timer_extra)
    (unit_dir / SERVICE).write_text(
        "[Unit]\nDescription=stand-in heal\n\n[Service]\nType=oneshot\n"
        f"ExecStart={exec_start}\nTimeoutStartSec=30s\n{service_extra}")
    return unit_dir


def py_stand_in(tmp_path, body):
    """``ExecStart`` running a small Python script (this interpreter)."""
    script = tmp_path / "stand_in.py"
    script.write_text("import os, sys, time\n" + body)
    return f"{sys.executable} {script}"


RECORDER = """
out = sys.argv[1]
busy = out + '.busy'
start = time.monotonic()
if os.path.exists(busy):
    open(out + '.overlap', 'a').close()
open(busy, 'w').close()
time.sleep(float(sys.argv[2]))
os.unlink(busy)
with open(out, 'a') as f:
    f.write('%r %r\\n' % (start, time.monotonic()))
"""


def test_the_runner_runs_the_command_periodically_and_logs_each_run(tmp_path):
    rec = tmp_path / "runs.txt"
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, RECORDER) + f" {rec} 0")
    log = tmp_path / "timer.log"
    with timer.running(str(units), period_override=0.2, log=str(log)) as runner:
        runs = runner.wait_for_runs(3, timeout=DEADLINE)
    assert len(runs) >= 3
    assert all(r.returncode == 0 and not r.timed_out for r in runs)
    text = log.read_text()
    assert "override" in text and "OnUnitActiveSec=15s" in text
    assert "run 1: exit 0" in text and "run 3: exit 0" in text
    assert len(rec.read_text().splitlines()) == len(runner.runs)


def test_runs_never_overlap_even_when_a_run_outlasts_the_period(tmp_path):
    rec = tmp_path / "runs.txt"
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, RECORDER) + f" {rec} 0.3")
    with timer.running(str(units), period_override=0.05, log=str(tmp_path / "log")) as runner:
        runs = runner.wait_for_runs(3, timeout=DEADLINE)
    assert not (tmp_path / "runs.txt.overlap").exists()
    assert "tick(s) during run 1: nothing started" in (tmp_path / "log").read_text()
    spans = [tuple(map(float, line.split())) for line in rec.read_text().splitlines()]
    assert len(spans) >= 3
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end
    for a, b in itertools.pairwise(runs):
        assert b.started >= a.started + a.duration


def test_the_timer_period_comes_from_the_unit_without_override(tmp_path):
    rec = tmp_path / "runs.txt"
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, RECORDER) + f" {rec} 0",
                        period="300ms")
    job = timer.load(str(units))
    assert job.period == pytest.approx(0.3)
    with timer.running(str(units), log=str(tmp_path / "log"), first_delay=0) as runner:
        runs = runner.wait_for_runs(2, timeout=DEADLINE)
    assert runs[1].started - runs[0].started >= 0.3 - 0.01


def test_stop_ends_the_runner_and_lets_a_running_heal_finish(tmp_path):
    rec = tmp_path / "runs.txt"
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, RECORDER) + f" {rec} 0.5")
    with timer.running(str(units), period_override=0.05, log=str(tmp_path / "log")) as runner:
        assert runner.wait_until_busy(timeout=DEADLINE)
    assert not runner.alive
    assert runner.runs and runner.runs[-1].returncode == 0
    assert len(rec.read_text().splitlines()) == len(runner.runs)
    assert not (tmp_path / "runs.txt.busy").exists()
    assert "stopped" in (tmp_path / "log").read_text()


def test_stop_with_kill_ends_a_long_heal_at_once(tmp_path):
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, "time.sleep(60)\n"))
    runner = timer.TimerRunner(timer.load(str(units)), log=str(tmp_path / "log"),
                               period_override=0.05)
    runner.start()
    assert runner.wait_until_busy(timeout=DEADLINE)
    t = time.monotonic()
    runner.stop(kill=True)
    assert time.monotonic() - t < 10
    assert not runner.alive
    assert runner.runs[-1].returncode != 0


def test_a_heal_that_outlives_timeoutstartsec_is_killed_and_the_timer_goes_on(tmp_path):
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, "time.sleep(60)\n"))
    text = (units / SERVICE).read_text().replace("TimeoutStartSec=30s", "TimeoutStartSec=300ms")
    (units / SERVICE).write_text(text)
    with timer.running(str(units), period_override=0.05, log=str(tmp_path / "log")) as runner:
        runs = runner.wait_for_runs(2, timeout=DEADLINE)
    assert all(r.timed_out and r.returncode != 0 for r in runs[:2])
    assert all(r.duration < 10 for r in runs[:2])
    assert "timed out" in (tmp_path / "log").read_text()


def test_a_missing_program_is_logged_as_systemd_would_and_the_timer_goes_on(tmp_path):
    units = write_units(tmp_path / "units", "/nonexistent/nvmeof-mp heal --all")
    with timer.running(str(units), period_override=0.05, log=str(tmp_path / "log")) as runner:
        runs = runner.wait_for_runs(2, timeout=DEADLINE)
    assert [r.returncode for r in runs[:2]] == [timer.EXIT_EXEC] * 2
    assert "203" in (tmp_path / "log").read_text()


def test_environment_and_a_relative_program_resolve_as_in_systemd(tmp_path):
    out = tmp_path / "env.txt"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = bindir / "stand-in-heal"
    prog.write_text(f"#!{sys.executable}\nimport os, sys\n"
                    f"open({str(out)!r}, 'w').write(repr((sys.argv[1:], os.environ.get('A'), "
                    "os.environ.get('B'), os.environ.get('C'), os.getcwd())))\n")
    prog.chmod(0o755)
    units = write_units(tmp_path / "units", "stand-in-heal heal --all",
                        service_extra='Environment="A=two words" B=2\nEnvironment=C=3\n')
    path = str(bindir) + os.pathsep + os.environ.get("PATH", "")
    with timer.running(str(units), period_override=0.05, log=str(tmp_path / "log"),
                       env={"PATH": path}) as runner:
        runs = runner.wait_for_runs(1, timeout=DEADLINE)
    assert runs[0].returncode == 0
    assert eval(out.read_text()) == (["heal", "--all"], "two words", "2", "3", "/")


def test_the_documented_drop_in_replaces_exec_start(tmp_path):
    """doc/source/cli.rst: an empty ExecStart=, then the venv's command, in a drop-in."""
    units = tmp_path / "units"
    units.mkdir()
    for name in (SERVICE, TIMER):
        shutil.copy(os.path.join(UNITS, name), units / name)
    (units / (SERVICE + ".d")).mkdir()
    (units / (SERVICE + ".d") / "venv.conf").write_text(
        "[Service]\nExecStart=\nExecStart=/opt/nvmeof/bin/nvmeof-mp heal --all\n"
        "Environment=NVMEOF_MP_LOCK_PATH=/var/lib/nova/tmp\n")
    job = timer.load(str(units))
    assert job.argv == ["/opt/nvmeof/bin/nvmeof-mp", "heal", "--all"]
    assert job.environment == {"NVMEOF_MP_LOCK_PATH": "/var/lib/nova/tmp"}
    assert job.user == "root"


def test_user_is_honoured(tmp_path):
    me = pwd.getpwuid(os.getuid()).pw_name
    units = write_units(tmp_path / "units", "/bin/true", service_extra=f"User={me}\n")
    with timer.running(str(units), period_override=0.05, log=str(tmp_path / "log")) as runner:
        assert runner.wait_for_runs(1, timeout=DEADLINE)[0].returncode == 0
    other = "nobody" if os.getuid() != pwd.getpwnam("nobody").pw_uid else "root"
    units = write_units(tmp_path / "units2", "/bin/sh -c 'id -u > /dev/null'",
                        service_extra=f"User={other}\n")
    if os.getuid() != 0:
        with pytest.raises(timer.UnitError, match="root"):
            timer.TimerRunner(timer.load(str(units)), log=str(tmp_path / "log2")).start()
        return
    log = tmp_path / "log3"  # opened by the runner: the run's output lands there
    units = write_units(tmp_path / "units3", "id -u", service_extra=f"User={other}\n")
    with timer.running(str(units), period_override=0.05, log=str(log)) as runner:
        assert runner.wait_for_runs(1, timeout=DEADLINE)[0].returncode == 0
    assert str(pwd.getpwnam(other).pw_uid) in log.read_text().splitlines()


def test_one_runner_per_service_at_a_time(tmp_path):
    units = write_units(tmp_path / "units", "/bin/true")
    with timer.running(str(units), period_override=60, log=str(tmp_path / "log")):
        with pytest.raises(timer.UnitError, match="already"):
            with timer.running(str(units), period_override=60, log=str(tmp_path / "log2")):
                pass
    with timer.running(str(units), period_override=60, log=str(tmp_path / "log")):
        pass


@pytest.mark.parametrize("service_extra, message", [
    ("Type=simple\n", "oneshot"),
    ("Frobnicate=yes\n", "Frobnicate"),
    ("ExecStart=/bin/false\n", "one ExecStart"),
    ("EnvironmentFile=/etc/x\n", "EnvironmentFile"),
])
def test_what_the_runner_cannot_honour_is_refused(tmp_path, service_extra, message):
    units = write_units(tmp_path / "units", "/bin/true", service_extra=service_extra)
    with pytest.raises(timer.UnitError, match=message):
        timer.load(str(units))


def test_a_timer_with_only_onunitactivesec_is_refused_as_it_would_never_fire(tmp_path):
    """systemd counts OnUnitActiveSec= from the service's last start: one that never started
    gives no base, so without OnBootSec= the timer never elapses (NEXT: n/a)."""
    units = write_units(tmp_path / "units", "/bin/true")
    text = (units / TIMER).read_text()
    (units / TIMER).write_text("".join(line for line in text.splitlines(keepends=True)
                                       if not line.startswith("OnBootSec=")))
    with pytest.raises(timer.UnitError, match="OnBootSec"):
        timer.load(str(units))


@pytest.mark.parametrize("exec_start", ["-/bin/true", "/bin/echo $HOME", "/bin/echo %n"])
def test_exec_start_prefixes_and_expansions_are_refused(tmp_path, exec_start):
    units = write_units(tmp_path / "units", exec_start)
    with pytest.raises(timer.UnitError):
        timer.load(str(units))


# ---------------------------------------------------------------- the udev rule


RULES = os.path.join(os.path.dirname(UNITS), "udev", "rules.d")


def test_the_udev_rule_starts_the_heal_service_on_a_failed_path_of_our_maps_only():
    from nvmeof_mp.privileged.dmsetup import DM_UUID_PREFIX
    text = open(os.path.join(RULES, timer.UDEV_RULE)).read()
    [rule] = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    keys = dict(re.findall(r'(\S+?)(?:==|\+=)"([^"]*)"', rule))
    assert keys == {"ACTION": "change", "SUBSYSTEM": "block",
                    "ENV{DM_ACTION}": "PATH_FAILED", "ENV{DM_UUID}": DM_UUID_PREFIX + "*",
                    "RUN": "/bin/systemctl --no-block start " + SERVICE}
    assert os.path.exists(os.path.join(UNITS, SERVICE))


def test_the_lab_copy_of_the_rule_changes_its_action_only(tmp_path):
    shipped = open(os.path.join(RULES, timer.UDEV_RULE)).read()
    lab = timer.udev_rule("/run/x/start-heal")
    assert lab.replace('RUN+="/bin/touch /run/x/start-heal"', timer.SYSTEMCTL_START) in shipped
    (tmp_path / timer.UDEV_RULE).write_text('ACTION=="change", RUN+="/bin/rm -rf /"\n')
    with pytest.raises(timer.UnitError):
        timer.udev_rule("/run/x/start-heal", rules_dir=tmp_path)


def test_a_start_request_runs_a_heal_now_and_joins_a_running_one(tmp_path):
    rec = tmp_path / "runs.txt"
    units = write_units(tmp_path / "units", py_stand_in(tmp_path, RECORDER) + f" {rec} 0.5")
    trigger = tmp_path / "start-heal"
    with timer.running(str(units), period_override=3600, first_delay=3600,
                       log=str(tmp_path / "log"), trigger=str(trigger)) as runner:
        trigger.touch()
        assert runner.wait_until_busy(DEADLINE)
        trigger.touch()                         # while it runs: joins, starts nothing more
        runs = runner.wait_for_runs(1, timeout=DEADLINE)
        time.sleep(0.5)
        assert len(runner.runs) == 1 and runs[0].returncode == 0
        assert not trigger.exists()
    text = (tmp_path / "log").read_text()
    assert "start-heal (udev): heal now" in text and "joins the running heal" in text

"""The gate's orchestration on the host: lanes of VMs, narrowed passes, the coverage table."""

import json
import threading

from nvmeof_mp.lab import coverage, gate, guest


def test_lanes_run_vms_at_once_and_a_broken_vm_fails_only_its_run(tmp_path):
    both_running = threading.Barrier(2, timeout=5)
    runs = [("6.1", "Y", False, ("user",)), ("6.12", "Y", False, ("user",)),
            ("5.10", "N", True, ("user",))]

    def start_vm(run):
        if run[0] == "5.10":
            raise RuntimeError("qemu would not start")
        both_running.wait()     # a BrokenBarrierError unless the first two overlap
        return 0, tmp_path

    results = gate.run_all(runs, start_vm, lanes=2, log=lambda line: None)
    assert [rc for rc, _, _ in results.values()] == [0, 0, 1]
    assert list(results) == [gate.describe(run) for run in runs]


def test_one_lane_runs_vms_one_after_the_other(tmp_path):
    running, overlapped, lock = [], threading.Event(), threading.Lock()

    def start_vm(run):
        with lock:
            if running:
                overlapped.set()
            running.append(run)
        # a VM lasts: give a second lane the time to start one beside it (an instant
        # start_vm would let two lanes run one after the other by chance)
        overlapped.wait(0.2)
        with lock:
            running.remove(run)
        return 0, tmp_path

    runs = [("6.1", "Y", False, ("user",)), ("6.1", "N", False, ("user",))]
    assert all(rc == 0 for rc, _, _ in gate.run_all(runs, start_vm, lanes=1,
                                                      log=lambda line: None).values())
    assert not overlapped.is_set(), "two VMs ran at once with one lane"


def test_a_pass_can_be_narrowed_on_its_own(monkeypatch, tmp_path):
    seen = []

    class Done:
        returncode = 0

    def run(cmd):
        seen.append(cmd[cmd.index("-m") + 1])
        return Done()

    monkeypatch.setattr(guest.subprocess, "run", run)
    monkeypatch.setattr(guest, "target_session", lambda: _null())
    monkeypatch.setattr(guest, "as_user", lambda cmd: cmd)
    monkeypatch.setenv("NVMEOF_MP_LAB_OUT", str(tmp_path))
    assert guest.gate_passes(["pytest"], passes=("user", "root:smoke")) == 0
    assert seen == ["gate", "gate and root_too and (smoke)"]
    assert "root:smoke pass rc=0" in (tmp_path / "gate-passes.txt").read_text()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _record(test, outcome, kernel="6.1.0-56-amd64", mp="Y", pass_="user", cover=None,
            **extra):
    return {"test": "tests/gate/test_x.py::" + test, "outcome": outcome, "kernel": kernel,
            "nvme_multipath": mp, "pass": pass_, "seconds": 1.0,
            "cover": cover if cover is not None else
            [{"scenario": "attach", "mode": "single", "transport": "tcp"}], **extra}


def test_coverage_cells_say_where_it_passed_and_why_not_elsewhere(tmp_path):
    raid = [{"scenario": "leg lost under I/O", "mode": "raid", "transport": "tcp"}]
    lines = [
        _record("test_a", "passed"),
        _record("test_a", "passed", mp="N", pass_="root"),
        _record("test_a", "passed", kernel="6.12.117+deb13-amd64"),
        _record("test_b", "skipped", kernel="6.12.117+deb13-amd64", mp="N",
                reason="needs nvme_core multipath=Y"),
        _record("test_r", "xfailed", kernel="5.10.0-32-amd64", cover=raid,
                xfail="5.10 rejects fast_io_fail_tmo"),
        _record("test_r", "failed", kernel="6.12.117+deb13-amd64", cover=raid),
        _record("test_free", "passed", cover=[]),
    ]
    (tmp_path / "gate-results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    kernels, rows = coverage.table(coverage.load([tmp_path]))
    assert kernels == ["5.10", "6.1", "6.12"]
    single = next(r for r in rows if r[0] == "single")[3]
    assert single["6.1"] == ("passed", "passed (N root, Y user)")
    assert single["6.12"] == ("passed", "passed (Y user)")      # the N skip is expected
    assert single["5.10"] == ("none", "-")
    leg = next(r for r in rows if r[0] == "raid")[3]
    assert leg["5.10"] == ("xfail", "known defect: 5.10 rejects fast_io_fail_tmo")
    assert leg["6.12"][0] == "failed" and "test_r" in leg["6.12"][1]
    text = coverage.render_rst(coverage.load([tmp_path]))
    assert "test_free" in text and "RAID1 (volume_replicas)" in text
    assert coverage.report([tmp_path], write=tmp_path / "t.rst", log=lambda line: None) == 1
    assert (tmp_path / "t.rst").read_text() == text


def test_a_cell_only_skipped_says_why():
    state, text = coverage.cell_text([_record("t", "skipped", reason="Skipped: kernel has "
                                               "no NVMe host authentication")])
    assert (state, text) == ("skipped", "does not run: kernel has no NVMe host authentication")


def test_kernel_columns_from_releases():
    assert [coverage.short_kernel(r) for r in (
        "5.10.0-32-amd64", "6.1.0-56-amd64", "6.12.117+deb13-amd64", "7.2.13+deb14-amd64")
    ] == ["5.10", "6.1", "6.12", "7.2"]


def test_the_gate_writer_writes_at_least_once_however_soon_it_is_stopped(tmp_path):
    """An open that waits (md failing a leg) ended in "nothing written, nothing failed"
    when stop() came first: the gate's write checks then failed on a working device."""
    import os

    import pytest

    from nvmeof_mp.lab import workload
    path = tmp_path / "dev"
    path.write_bytes(b"\0" * workload.BLOCK * 4)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    w = workload.Writer(str(path), blocks=4)
    w._halt.set()                           # stopped before the thread ever ran
    w.start()
    w.stop()
    assert (w.ops, w.errors) == (1, [])


def test_vms_in_lanes_get_one_vcpu_each_and_a_vm_alone_two():
    """Two VMs of two vCPUs on the 2-core machine preempt each other's spinlock holders
    (198 s against 76 s for the same pair): in lanes each VM gets one, unless asked."""
    assert gate.vm_smp(0, gate.CI_LANES) == gate.LANE_SMP == 1
    assert gate.vm_smp(0, 1) == gate.ALONE_SMP == 2
    assert gate.vm_smp(4, gate.CI_LANES) == 4

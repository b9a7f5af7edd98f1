"""Gate suite: runs INSIDE the lab VM against the real kernel (see doc/source/lab.rst).

Two passes per VM.  First the test process is the unprivileged lab user; root actions go
through the real privsep daemon started by ``$NVMEOF_MP_ROOT_HELPER`` (sudo + our rootwrap
filter), as on a deployed compute host.  Then the tests marked ``root_too`` run again as root
with no root helper: the library forks its privsep daemon (oslo.privsep's fork method), as a
service running as root does.  The nvmet target is driven through the root target agent at
``$NVMEOF_MP_TARGET_SOCK``.
"""

import json
import os
import signal
import time

import pytest

from nvmeof_mp.lab.workload import native_multipath

IN_LAB = bool(os.environ.get("NVMEOF_MP_TARGET_SOCK"))
#: the attachment registry's records (nvmeof_mp.privileged.registry)
REGISTRY_VOLUMES = "/var/lib/nvmeof_mp/volumes"
#: A gate test that takes longer fails instead of hanging the VM run (and every test after it).
TEST_TIMEOUT = float(os.environ.get("NVMEOF_MP_GATE_TEST_TIMEOUT", "300"))
#: The ``smoke`` selection (``nvmeof-mp lab gate --smoke``) for the kernels CI only samples:
#: one test per mode and safety concern (single path, native multipath, RAID1 under I/O,
#: dm-multipath over replicas, registry shared subsystem, detach with every path dead).
SMOKE_TESTS = frozenset({
    "test_single_path",
    "test_native_multipath_two_portals",
    "test_raid1_with_leg_failure_during_io",
    "test_dm_multipath_over_replicas",
    "test_dm_multipath_over_native_multipath_replicas",
    "test_registry_shared_subsystem_last_volume_takes_the_controllers",
    "test_nvme_detach_with_every_path_dead_fails_fast_or_forces",
    # multipathd's claim refused (native multipath off): every N kernel, and as root on 6.1
    "test_greedy_without_the_drop_in_is_refused_cleanly",
})
#: Whole modules in the smoke selection: DH-HMAC-CHAP is proven on every kernel CI boots
#: (a kernel without host authentication shows why it skips; 7.2 is the newest target),
#: through the library's own fabrics writes; the nvme-cli variants (``connect_method``) run
#: in the full passes only (6.1 and 6.12): a rejected key can cost the kernel's 60 s admin
#: timeout under TCG, three of them were half of a smoke VM's time.
SMOKE_MODULES = frozenset({"test_gate_auth.py"})
#: Parameter ids a test of SMOKE_MODULES must not carry to be in the smoke selection.
SMOKE_MODULE_SKIP_IDS = ("nvme-cli",)
#: Modules that test the library's own bookkeeping - the registry, locks, the privsep
#: daemon's start and death, the privilege boundary, in-use detection - through the same
#: kernel calls every other test makes: marked ``bookkeeping``, run in full on 6.1 (the CI
#: matrix leaves them out on 6.12 to fit its time, see nvmeof_mp/lab/gate.py).
BOOKKEEPING_MODULES = frozenset({"test_gate_registry.py", "test_gate_safety.py",
                                 "test_gate_boundary.py", "test_gate_inuse.py",
                                 "test_gate_coverage_entry.py"})
#: Fault injection under I/O (minutes per VM), marked ``faults``: each fault runs on two
#: modes per VM (single + RAID1 with multipath N, native + DM with Y), so CI runs it on one VM
#: per setting (6.1 N and 6.12 Y) and every mode meets every fault once.
FAULT_MODULES = frozenset({"test_gate_faults.py"})
#: RDMA (soft-RoCE) modules, marked ``rdma``: the CI matrix runs them with native multipath
#: on (6.1 and 6.12; their dm and RAID legs do not depend on the setting)
RDMA_MODULES = frozenset({"test_gate_rdma.py"})
#: Known failures on a kernel: (tests, first kernel (major, minor) without it, reason).
#: strict xfail, so the day the cause is fixed the XPASS fails and the entry goes.
KERNEL_XFAILS = ()
#: per-test outcomes (JSON lines) in the run directory, for the coverage table
RESULTS_FILE = "gate-results.jsonl"
#: the modes of the coverage table's rows (``cover`` marker): single path, native NVMe
#: multipath, RAID1 over volume_replicas, dm-multipath over dm_replicas (one portal each),
#: dm-multipath over replicas that are each native-multipathed
COVER_MODES = ("single", "native", "raid", "dm", "dm-native")
#: the transports of the coverage table's columns
COVER_TRANSPORTS = ("tcp", "rdma", "tcp+rdma")


def cover_cells(item) -> list:
    """The coverage-table cells a test declares with ``@pytest.mark.cover(scenario, mode=,
    transport=)`` (on the test, or on one ``pytest.param`` of it): [{scenario, mode,
    transport}].  A mode or transport outside COVER_MODES / COVER_TRANSPORTS is an error."""
    cells = []
    for mark in item.iter_markers("cover"):
        scenario, = mark.args
        mode = mark.kwargs.get("mode", "single")
        transport = mark.kwargs.get("transport", "tcp")
        if mode not in COVER_MODES or transport not in COVER_TRANSPORTS:
            raise pytest.UsageError("%s: cover mode %r / transport %r unknown" % (
                item.nodeid, mode, transport))
        cells.append({"scenario": scenario, "mode": mode, "transport": transport})
    return cells


def root_helper():
    """The root helper the connector gets: the deployed one for the lab user, none as root
    (the library then forks its privsep daemon)."""
    return None if os.getuid() == 0 else os.environ["NVMEOF_MP_ROOT_HELPER"]


class GateTestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """SIGALRM after TEST_TIMEOUT: interrupts a flock, a lock wait or a socket read of the
    main thread, so a hang shows up as a failed test."""
    def expired(signum, frame):
        raise GateTestTimeout("gate test still running after %ss" % TEST_TIMEOUT)
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def in_smoke(item, module) -> bool:
    if item.originalname in SMOKE_TESTS:
        return True
    callspec = getattr(item, "callspec", None)
    params = {str(v) for v in callspec.params.values()} if callspec else set()
    return module in SMOKE_MODULES and not params & set(SMOKE_MODULE_SKIP_IDS)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gate)
            item.user_properties.append(("cover", cover_cells(item)))
            module = os.path.basename(str(item.fspath))
            if in_smoke(item, module):
                item.add_marker(pytest.mark.smoke)
            if module in BOOKKEEPING_MODULES:
                item.add_marker(pytest.mark.bookkeeping)
            if module in FAULT_MODULES:
                item.add_marker(pytest.mark.faults)
            if module in RDMA_MODULES:
                item.add_marker(pytest.mark.rdma)
            for names, fixed_in, reason in KERNEL_XFAILS:
                if IN_LAB and item.originalname in names and kernel_version() < fixed_in:
                    item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
            if not IN_LAB:
                item.add_marker(pytest.mark.skip(reason="gate tests run in the lab VM"))
            for mark, wanted in (("native", True), ("no_native", False)):
                if item.get_closest_marker(mark) and native_multipath() != wanted:
                    item.add_marker(pytest.mark.skip(
                        reason="needs nvme_core multipath=%s" % ("Y" if wanted else "N")))


def kernel_version(release=None) -> tuple:
    """(major, minor) of the running kernel: ``5.10.0-32-amd64`` -> (5, 10)."""
    from nvmeof_mp.hostinfo import release_tuple
    return release_tuple(release or os.uname().release)


def cinder_selected(config) -> bool:
    """Can this run select the ``cinder`` tests (not a smoke run, no -k naming others)?"""
    marks = config.getoption("markexpr") or ""
    keyword = config.getoption("keyword") or ""
    return ("smoke" not in marks and "not cinder" not in marks
            and (not keyword or "cinder" in keyword))


def pytest_configure(config):
    config.addinivalue_line("markers", "native: needs nvme_core multipath=Y")
    config.addinivalue_line("markers", "no_native: needs nvme_core multipath=N")
    config.addinivalue_line("markers", "root_too: also runs as root without a root helper "
                            "(forked privsep daemon): tests whose subject depends on how the "
                            "daemon starts and dies (start, death, the privilege boundary, "
                            "processes, the CLI, root-only paths) and one attach per mode; a "
                            "mode's kernel-side behaviour under a fault is the same either way "
                            "and runs in the user pass only")
    if IN_LAB and os.environ.get("NVMEOF_MP_CINDER_PYTHON") and cinder_selected(config):
        # Cinder's imports take a minute and more under TCG: overlap them with collection
        from nvmeof_mp.lab.agent import TargetClient, TargetError
        try:
            TargetClient().cinder("start")
        except (OSError, TargetError) as exc:     # the cinder tests fail with it, not the gate
            print("gate: the Cinder worker did not start: %s" % exc)
    config.addinivalue_line("markers", "cinder: the Cinder LVM-NVMeoF job (Cinder's LVM driver "
                            "and nvmet target helper; nvmeof-mp lab cinder)")
    config.addinivalue_line("markers", "smoke: the sample run on every kernel (SMOKE_TESTS)")
    config.addinivalue_line("markers", "faults: fault injection under I/O (FAULT_MODULES)")
    config.addinivalue_line("markers", "rdma: soft-RoCE transport tests (RDMA_MODULES)")
    config.addinivalue_line("markers", "bookkeeping: the library's own bookkeeping "
                            "(BOOKKEEPING_MODULES)")
    config.addinivalue_line("markers", "cover(scenario, mode='single', transport='tcp'): the "
                            "cell of the coverage table (doc/source/coverage.rst) this test "
                            "proves; mode one of COVER_MODES")


def result_record(report, kernel: str, multipath: bool, as_root: bool) -> dict:
    """One line of RESULTS_FILE: what ran where (kernel, multipath, pass) and how it ended."""
    outcome = report.outcome
    if hasattr(report, "wasxfail"):  # pytest reports an xfail as skipped, an xpass as passed
        outcome = "xfailed" if report.skipped else "xpassed"
    return {"test": report.nodeid, "outcome": outcome, "when": report.when,
            "kernel": kernel, "nvme_multipath": "Y" if multipath else "N",
            "pass": "root" if as_root else "user", "seconds": round(report.duration, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"reason": report.longrepr[2]} if report.skipped
               and isinstance(report.longrepr, tuple) else {}),
            **({"xfail": report.wasxfail} if hasattr(report, "wasxfail") else {}),
            "cover": dict(report.user_properties).get("cover", [])}


def pytest_runtest_logreport(report):
    """Append the test's outcome to RESULTS_FILE: its call phase, or a failed/skipped
    setup or teardown (a call that never ran, or a leftover found after it)."""
    out = os.environ.get("NVMEOF_MP_LAB_OUT")
    if not (IN_LAB and out and "tests/gate/" in report.nodeid):
        return
    if report.when != "call" and report.outcome == "passed":
        return
    record = result_record(report, os.uname().release, native_multipath(), os.getuid() == 0)
    with open(os.path.join(out, RESULTS_FILE), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


@pytest.fixture
def target():
    from nvmeof_mp.lab.agent import TargetClient
    client = TargetClient()
    client.teardown()
    client.clear_registry()     # records a test without ``no_leftovers`` left would hold refs
    yield client
    client.teardown()


@pytest.fixture(scope="session")
def connector():
    """The connector as the lab user through the root helper, or as root without one.

    As root its privsep daemon is forked here, outside any lock, as a root service's startup
    (get_connector_properties) would; a daemon forked by the first attach is the business
    of ``test_gate_safety``.
    """
    from nvmeof_mp.connector import NVMeOFConnector
    conn = NVMeOFConnector(root_helper=root_helper(), use_multipath=True)
    if os.getuid() == 0:
        conn.kernel.read_system_uuid()
    return conn


@pytest.fixture
def no_leftovers():
    """After the test: no controller, md array or dm map of ours is left behind.

    What a failed test leaves is cleaned up (by the root agent) before this fails, so the
    next test starts from a clean host instead of failing too.
    """
    yield
    left = os.listdir("/sys/class/nvme") if os.path.isdir("/sys/class/nvme") else []
    mds = [d for d in os.listdir("/sys/block") if d.startswith("md")]
    dms = [d for d in os.listdir("/sys/block") if d.startswith("dm-")]
    records = sorted(os.listdir(REGISTRY_VOLUMES)) if os.path.isdir(REGISTRY_VOLUMES) else []
    if left or mds or dms or records:
        from nvmeof_mp.lab.agent import TargetClient
        TargetClient().cleanup_initiator()
        TargetClient().clear_registry()
    assert (left, mds, dms, records) == ([], [], [], []), "left behind: %s %s %s %s" % (
        left, mds, dms, records)

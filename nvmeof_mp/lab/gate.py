"""The gate over kernels: which VMs run which passes (CI_MATRIX), and running them in lanes.

Each VM boots one Debian kernel with one nvme_core multipath setting and runs the gate suite
in it (``guest.gate_passes``).  A *pass* is ``user`` (the lab user through sudo + rootwrap)
or ``root`` (root without a root helper: the forked privsep daemon), optionally narrowed by a
marker expression after a colon: ``root:smoke`` is the root pass over the smoke tests only.

VMs run ``lanes`` at a time, each with one vCPU then (``vm_smp``): under TCG a vCPU is a
host thread, and two VMs of two vCPUs on two cores keep preempting a vCPU that holds a guest
spinlock while its sibling spins for it.  Measured on the 2-core machine, the same two gate
VMs took 198 s with two vCPUs each and 76 s with one; a VM alone takes 63-67 s either way.
"""

from __future__ import annotations

import concurrent.futures
import sys
import time
from pathlib import Path

#: ``gate --matrix``, the CI split: (kernel, nvme_core multipath, smoke tests only, passes).
#: 6.1 (Debian 12, the deployment target) runs everything with both settings; the root pass
#: (how the privsep daemon starts, not what the kernel does: ``root_too``) runs in full once,
#: with multipath=Y, and over the smoke tests with N.  The Cinder LVM-NVMeoF job runs as Nova
#: does (the user pass) with native multipath, on 6.1 and 6.12.  6.12 runs everything with
#: native multipath but the library's bookkeeping tests (registry, locks, daemon, privilege
#: boundary: the same kernel calls as the rest; they run in full with 6.1 Y only), and the
#: smoke tests without it.  Fault injection runs with 6.1 N (single path, RAID1) and 6.12 Y
#: (native, DM); RDMA with 6.1 Y and 6.12 Y.  5.10 and 7.2, the oldest and newest, the smoke
#: tests in one setting each (5.10 without native multipath, dm-multipath's era; 7.2 with
#: it).  Ordered longest first, which is how the lanes are filled.  The VMs are CPU-bound
#: under TCG (one vCPU each in lanes), so the wall time of the matrix is about the sum of the
#: VMs' times alone divided by the two cores: every test here costs CI time.
CI_MATRIX = (("6.1", "Y", False, ("user:not faults", "root:not cinder")),
             ("6.12", "Y", False, ("user:not bookkeeping",)),
             ("6.1", "N", False, ("user:not cinder and not bookkeeping and not rdma",
                                  "root:smoke")),
             ("6.12", "N", True, ("user",)),
             ("5.10", "N", True, ("user",)),
             ("7.2", "Y", True, ("user",)))
#: VMs at once for ``--matrix`` (the 2-core CI machine)
CI_LANES = 2
#: vCPUs of a VM that runs alone, and of each VM when several run at once (see above)
ALONE_SMP, LANE_SMP = 2, 1


def vm_smp(requested: int, lanes: int) -> int:
    """The VM's vCPUs: ``--smp`` when given, else one per VM when VMs share the cores."""
    return requested or (LANE_SMP if lanes > 1 else ALONE_SMP)


def describe(run) -> str:
    version, mp, smoke, passes = run
    return (f"kernel {version} multipath={mp}{' smoke' if smoke else ''} "
            f"({', '.join(passes)})")


def run_all(runs, start_vm, lanes: int = 1, log=print) -> dict:
    """Run ``start_vm(run)`` for each run, ``lanes`` at a time, longest (first) first.

    ``start_vm`` returns (rc, out_dir).  Returns {describe(run): (rc, seconds, out_dir)} in
    the order of ``runs``; an exception in one VM is that run's failure (rc 1), not the end
    of the others.
    """
    def one(run):
        t = time.monotonic()
        log(f"lab: gate {describe(run)} started")
        try:
            rc, out_dir = start_vm(run)
        except Exception as exc:    # a broken VM run fails that run, the others go on
            log(f"lab: gate {describe(run)}: {type(exc).__name__}: {exc}")
            rc, out_dir = 1, None
        seconds = time.monotonic() - t
        log(f"lab: gate {describe(run)} rc={rc} in {seconds:.0f}s")
        return rc, seconds, out_dir

    with concurrent.futures.ThreadPoolExecutor(max(1, lanes)) as pool:
        futures = {describe(run): pool.submit(one, run) for run in runs}
        return {key: future.result() for key, future in futures.items()}


def report_files(out_dir: Path | None, echo=True) -> None:
    """The per-pass lines and metrics a VM left in its run directory, to stderr."""
    if out_dir is None:
        return
    for name in ("gate-passes.txt", "gate-metrics.txt"):
        if echo and (out_dir / name).exists():
            print((out_dir / name).read_text(), end="", file=sys.stderr)
    if (out_dir / "gate-results.jsonl").exists():
        print(f"lab: per-test results {out_dir / 'gate-results.jsonl'}", file=sys.stderr)


def print_failures(out_dir: Path | None, limit: int = 40) -> None:
    """The failed tests and pytest's summary lines of a VM's console, to stderr (with lanes
    the console is not echoed)."""
    log = out_dir / "console.log" if out_dir else None
    if log is None or not log.exists():
        return
    wanted = ("FAILED ", "ERROR ", " failed", " error", "Timeout", "gate: ")
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if any(w in line for w in wanted)]
    for line in lines[-limit:]:
        print(f"  {out_dir.name}: {line}", file=sys.stderr)

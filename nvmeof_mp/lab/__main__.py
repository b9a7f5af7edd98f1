"""``python -m nvmeof_mp.lab``: prepare the lab, open a VM shell, smoke-test, run commands.

Host commands:
  prepare                       install tools (apt, as root) + fetch/build the kernel
  shell [--nvme-multipath N]    interactive root shell in the VM (Ctrl-A x quits qemu)
  smoke                         target + 2 TCP paths + sudo/rootwrap check, with timings
  guest-run [--as-user] -- CMD  CMD in the VM with the target agent up
  demo                          the main job on the real kernel, with progress
  gate [--passes P] [-- ARGS]   tests/gate in the VM, nvme_core multipath Y then N; in each
                                VM as the lab user, then the root_too tests as root;
                                --kernel 6.1,6.12 runs it on each kernel, --smoke only
                                the smoke tests
  cinder [--passes P] [-- ARGS] the gate's Cinder LVM-NVMeoF tests (-m cinder) on kernels
                                6.1 and 6.12; builds the Cinder venv first
Every VM command takes --kernel 5.10|6.1|6.12|7.2 (Debian's kernel of that version,
default 6.1).
  bench [--runs N] [--only ..]  attach performance against os-brick in the VM
Guest-side commands (run by the VM; ``_guest-*``) are internal.
"""

import argparse
import sys
import time

from . import paths
from .kernel import DEFAULT_VERSION, SUITES, LabError


def _vm_kwargs(args) -> dict:
    opts = {}
    if args.nvme_multipath:
        opts["nvme_core"] = f"multipath={args.nvme_multipath}"
    from .gate import vm_smp
    return {"timeout": args.timeout, "mem_mb": args.mem,
            "smp": vm_smp(args.smp, 1),
            "kernel_args": args.kernel_args, "modprobe_options": opts,
            "echo": not args.quiet, "kernel_version": _kernels(args)[0]}


def kernel_list(text: str | None) -> list:
    """``--kernel 6.1,6.12`` -> ['6.1', '6.12'] (checked against kernel.SUITES)."""
    wanted = [k.strip() for k in (text or DEFAULT_VERSION).split(",") if k.strip()]
    bad = [k for k in wanted if k not in SUITES]
    if bad or not wanted:
        raise LabError(f"unknown kernel {','.join(bad) or text!r}; choose from "
                       + ", ".join(SUITES))
    return list(dict.fromkeys(wanted))


def _kernels(args) -> list:
    return kernel_list(getattr(args, "kernel", None))


def _report(result, t0: float) -> int:
    print(f"lab: guest rc={result.returncode} boot-to-command={result.boot_seconds}s "
          f"vm={result.seconds:.1f}s total={time.monotonic() - t0:.1f}s "
          f"console={result.console_log_path}", file=sys.stderr)
    if result.timed_out:
        return 124
    return 125 if result.returncode is None else result.returncode


def _guest_module_argv(*args) -> list:
    return [str(paths.venv_python()), "-m", "nvmeof_mp.lab", *args]


def cmd_prepare(args) -> int:
    from . import vm
    t0 = time.monotonic()
    vm.ensure_tools()
    t1 = time.monotonic()
    kernel = vm.prepare_kernel(force=args.refresh, version=kernel_list(args.kernel)[0])
    t2 = time.monotonic()
    print(f"lab: tools {t1 - t0:.1f}s, kernel {t2 - t1:.1f}s: {kernel.package} "
          f"({kernel.vmlinux.parent})")
    return 0


def cmd_shell(args) -> int:
    from . import vm
    vm.prepare(version=_kernels(args)[0])
    t0 = time.monotonic()
    result = vm.run_in_vm([], interactive=True, **_vm_kwargs(args))
    _report(result, t0)
    return 124 if result.timed_out else 0


def cmd_smoke(args) -> int:
    from . import vm
    t0 = time.monotonic()
    vm.prepare(version=_kernels(args)[0])
    result = vm.run_in_vm(_guest_module_argv("_guest-smoke"), **_vm_kwargs(args))
    return _report(result, t0)


def cmd_guest_run(args) -> int:
    from . import vm
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("guest-run: no command given (guest-run [--as-user] -- CMD...)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    vm.prepare(version=_kernels(args)[0])
    argv = _guest_module_argv("_guest-run", *(["--as-user"] if args.as_user else []), "--", *cmd)
    return _report(vm.run_in_vm(argv, **_vm_kwargs(args)), t0)


def _as_user_in_vm(args, cmd, **overrides):
    from . import vm
    vm.prepare(version=_kernels(args)[0])
    kwargs = dict(_vm_kwargs(args), **overrides)
    kwargs["env"] = dict(kwargs.get("env") or {}, PYTHONDONTWRITEBYTECODE="1")
    return vm.run_in_vm(_guest_module_argv("_guest-run", "--as-user", "--", *cmd), **kwargs)


def cmd_demo(args) -> int:
    t0 = time.monotonic()
    result = _as_user_in_vm(args, [str(paths.venv_python()), "-m", "nvmeof_mp.lab.demo"])
    return _report(result, t0)


def gate_runs(args) -> list:
    """(kernel, multipath, smoke, passes) per VM: the CI matrix, or kernels x settings."""
    from .gate import CI_MATRIX
    if args.matrix:
        return list(CI_MATRIX)
    passes = ("user", "root") if args.passes == "both" else (args.passes,)
    settings = [args.nvme_multipath] if args.nvme_multipath else ["Y", "N"]
    return [(v, mp, args.smoke, passes) for v in _kernels(args) for mp in settings]


def cmd_gate(args) -> int:
    """The gate suite in one VM per kernel and nvme_core multipath setting; fails if any fails.

    In each VM the suite runs as the lab user through the root helper, then its ``root_too``
    tests run again as root without a root helper (forked privsep daemon), see
    ``guest.gate_passes``.  Per-test outcomes (kernel, multipath, pass) are in each run's
    ``gate-results.jsonl``; with ``--matrix`` the coverage table is made from them
    (``lab.coverage``).  VMs run ``--lanes`` at a time (``gate.run_all``).
    """
    from . import gate, vm
    t0 = time.monotonic()
    runs = gate_runs(args)
    for version in dict.fromkeys(run[0] for run in runs):
        vm.prepare(version=version)
    lanes = getattr(args, "lanes", 0) or (gate.CI_LANES if args.matrix else 1)
    extra = [a for a in args.pytest_args if a != "--"]
    echo = not args.quiet and lanes == 1
    guest_env = {"PYTHONDONTWRITEBYTECODE": "1", **_cinder_env()}
    only = getattr(args, "only", None)

    def start_vm(run):
        version, mp, smoke, passes = run
        narrow = "smoke" if smoke else only
        cmd = _guest_module_argv("_guest-gate", "--passes", ",".join(passes),
                                 *(["--only", narrow] if narrow else []), "--", *extra)
        kwargs = dict(_vm_kwargs(args), modprobe_options={"nvme_core": f"multipath={mp}"},
                      kernel_version=version, echo=echo, smp=gate.vm_smp(args.smp, lanes))
        kwargs["env"] = guest_env
        result = vm.run_in_vm(cmd, **kwargs)
        rc = _report(result, t0)
        gate.report_files(result.out_dir, echo=True)
        if rc:
            gate.print_failures(result.out_dir)
        return rc, result.out_dir

    def log(line):      # one write per line: lanes log from several threads
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    results = gate.run_all(runs, start_vm, lanes=lanes, log=log)
    print("lab: gate results " + ", ".join(f"{k}: rc={rc} ({s:.0f}s)"
                                           for k, (rc, s, _) in results.items())
          + f" in {time.monotonic() - t0:.0f}s ({lanes} at a time)", file=sys.stderr)
    if args.matrix:
        from . import coverage
        dirs = [d for _, _, d in results.values() if d is not None]
        (paths.lab_dir() / coverage.LAST_MATRIX).write_text("".join(f"{d}\n" for d in dirs))
        coverage.report(dirs, log=log)
    return 0 if all(rc == 0 for rc, _, _ in results.values()) else 1


def cmd_coverage(args) -> int:
    """The coverage table from gate runs (default: the last ``gate --matrix``)."""
    from . import coverage
    dirs = args.run_dirs
    if not dirs:
        last = paths.lab_dir() / coverage.LAST_MATRIX
        if not last.exists():
            raise LabError("no run directories given and no 'lab gate --matrix' run yet")
        dirs = last.read_text().split()
    failed = coverage.report(dirs, write=args.write, log=print)
    if args.write:
        print(f"lab: coverage table written to {args.write}")
    return 1 if failed else 0


def _cinder_env() -> dict:
    """The Cinder venv for the gate's ``cinder`` tests, built if missing; they skip with the
    reason when it cannot be built (no network)."""
    import subprocess

    from . import cinder
    try:
        cinder.ensure_venv()
    except (LabError, OSError, subprocess.CalledProcessError) as exc:
        print(f"lab: no Cinder venv ({exc}); the cinder tests will skip", file=sys.stderr)
    return cinder.guest_env()


#: ``nvmeof-mp lab cinder``: the kernels of the Cinder LVM-NVMeoF job
CINDER_KERNELS = "6.1,6.12"


def cmd_cinder(args) -> int:
    """The Cinder LVM-NVMeoF job: the gate narrowed to ``-m cinder``, on 6.1 and 6.12."""
    args.kernel = args.kernel or CINDER_KERNELS
    args.only, args.matrix, args.smoke = "cinder", False, False
    return cmd_gate(args)


OS_BRICK = "os-brick==7.1.1"     # the release measured in shared kernel facts


def osbrick_venv():
    """os-brick from PyPI in a virtualenv of its own (lab cache), made once."""
    venv = paths.lab_dir() / "osbrick-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        import subprocess
        print(f"lab: installing {OS_BRICK} into {venv}", file=sys.stderr, flush=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", OS_BRICK], check=True)
    return python


def cmd_bench(args) -> int:
    """Ours against os-brick on the real kernel; table on stdout, JSON in the run folder."""
    from . import vm
    t0 = time.monotonic()
    vm.prepare(version=_kernels(args)[0])
    osb = osbrick_venv()
    out = "$NVMEOF_MP_LAB_OUT/bench.json"
    cmd = ["bash", "-c", f"exec {paths.venv_python()} -m nvmeof_mp.lab.bench "
           f"--osbrick-python {osb} --out {out} --runs {args.runs}"
           + (f" --only {args.only}" if args.only else "")]
    result = vm.run_in_vm(_guest_module_argv("_guest-run", "--", *cmd), **_vm_kwargs(args))
    for name in ("bench.txt", "bench.json"):
        if (result.out_dir / name).exists():
            print(f"lab: {result.out_dir / name}", file=sys.stderr)
    if (result.out_dir / "bench.txt").exists():
        print((result.out_dir / "bench.txt").read_text(), end="")
    return _report(result, t0)


def cmd_guest_smoke(args) -> int:
    from . import guest
    return guest.smoke()


def cmd_guest_gate(args) -> int:
    from . import guest
    # faulthandler: the stacks of a test that hangs (tests/gate/conftest.py fails it at 300 s)
    pytest = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
              "-o", "faulthandler_timeout=280", str(paths.project_dir() / "tests" / "gate")]
    extra = [a for a in args.pytest_args if a != "--"]
    return guest.gate_passes(pytest, extra, passes=tuple(args.passes.split(",")),
                             only=args.only)


def cmd_guest_run_inside(args) -> int:
    from . import guest
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return guest.guest_run(cmd, user=args.as_user)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nvmeof_mp.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def vm_command(name, func, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--timeout", type=int, default=600, help="kill the VM after this (s)")
        p.add_argument("--mem", type=int, default=1536, help="guest memory (MiB)")
        p.add_argument("--smp", type=int, default=0,
                       help="vCPUs (default: 2 for a VM alone, 1 each for VMs in lanes)")
        p.add_argument("--nvme-multipath", choices=("Y", "N"),
                       help="nvme_core multipath module parameter")
        p.add_argument("--kernel-args", default="", help="extra kernel command line")
        p.add_argument("--kernel", help="Debian kernel to boot: " + ", ".join(SUITES)
                       + f" (default {DEFAULT_VERSION}); gate takes a list: 6.1,6.12")
        p.add_argument("--quiet", action="store_true", help="console only to the log file")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("prepare", help="install tools, fetch kernel, build initramfs")
    p.add_argument("--refresh", action="store_true", help="ask apt for a newer kernel")
    p.add_argument("--kernel", help="kernel version: " + ", ".join(SUITES))
    p.set_defaults(func=cmd_prepare)
    vm_command("shell", cmd_shell, "interactive root shell in the VM")
    vm_command("smoke", cmd_smoke, "boot, target + 2 paths, connect/disconnect")
    p = vm_command("guest-run", cmd_guest_run, "run CMD in the VM with the target agent")
    p.add_argument("--as-user", action="store_true", help="run CMD as the lab user")
    p.add_argument("cmd", nargs=argparse.REMAINDER)

    vm_command("demo", cmd_demo, "the main job on the real kernel")
    p = vm_command("bench", cmd_bench, "attach performance against os-brick (real kernel)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", help="subset: cold,single,k8,k32,raid,procs,import")
    p = vm_command("gate", cmd_gate, "gate tests in the VM (multipath Y and N)")
    p.add_argument("--passes", choices=("both", "user", "root"), default="both",
                   help="as the lab user via the root helper, as root without one, or both")
    p.add_argument("--smoke", action="store_true", help="only the tests marked smoke")
    p.add_argument("--matrix", action="store_true",
                   help="the CI split over all kernels (CI_MATRIX); ignores --kernel, "
                   "--nvme-multipath, --smoke and --passes")
    p.add_argument("--lanes", type=int, default=0,
                   help="VMs at once (default: %d with --matrix, else 1)" % 2)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(timeout=2400)
    p = vm_command("cinder", cmd_cinder, "the Cinder LVM-NVMeoF job (gate -m cinder, 6.1+6.12)")
    p.add_argument("--passes", choices=("both", "user", "root"), default="both",
                   help="as the lab user via the root helper, as root without one, or both")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(timeout=2400)

    p = sub.add_parser("coverage", help="the coverage table from gate results (no VM)")
    p.add_argument("run_dirs", nargs="*", help="run directories (default: the last --matrix)")
    p.add_argument("--write", help="also write the table there (doc/source/coverage.rst)")
    p.set_defaults(func=cmd_coverage)
    p = sub.add_parser("_guest-smoke")
    p.set_defaults(func=cmd_guest_smoke)
    p = sub.add_parser("_guest-gate")
    p.add_argument("--passes", default="user,root")
    p.add_argument("--only", help="marker expression narrowing both passes")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_guest_gate)
    p = sub.add_parser("_guest-run")
    p.add_argument("--as-user", action="store_true")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_guest_run_inside)
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

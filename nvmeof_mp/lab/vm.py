"""Host side of the lab: tools, kernel and ``run_in_vm`` (stdlib only).

Why a VM: the host kernel has no NVMe and cannot load modules; KVM is not usable, so qemu
runs in TCG mode.  The guest's root is the host's root (9p, read-only, tmpfs overlay), so the
checkout and its venv are used in place, at the same paths.  A second, writable 9p share
(``out_dir``, same path in the guest) carries the guest command's exit code and results back.
"""

import compileall
import ctypes
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import LAB_USER, ROOTWRAP_CONF, ROOTWRAP_FILTERS_DIR, paths
from .kernel import Kernel, LabError, prepare_kernel  # noqa: F401  (re-exported)

#: tool -> Debian package providing it
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "nvme": "nvme-cli",
    "mdadm": "mdadm",
    "multipath": "multipath-tools",
    "dmsetup": "dmsetup",
    "busybox": "busybox-static",
    "sudo": "sudo",
    "depmod": "kmod",
    "modprobe": "kmod",
}
#: Modules guest init loads (nvme_core first so its options apply).
GUEST_MODULES = ("nvme_core", "nvme_fabrics", "nvme_tcp", "nvmet", "nvmet_tcp", "raid1",
                 "dm_multipath", "dm_round_robin", "dm_service_time", "loop")
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass
class VMResult:
    """Outcome of one VM run; ``returncode`` is None if the guest never reported one."""

    returncode: int | None
    console_log_path: Path
    out_dir: Path
    seconds: float
    timed_out: bool = False
    #: guest uptime (s) when the guest command started: boot + module/user setup cost
    boot_seconds: float | None = None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def _missing_packages() -> list[str]:
    pkgs = [pkg for tool, pkg in TOOLS.items() if _which(tool) is None]
    if "busybox-static" not in pkgs:
        try:
            from .kernel import _static_busybox
            _static_busybox()
        except LabError:  # the dynamic busybox package cannot run in the initramfs
            pkgs.append("busybox-static")
    return sorted(set(pkgs))


def ensure_tools(log=print) -> None:
    """Install the host tools the lab needs (as root via apt-get), or say what is missing."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError("missing packages (install them as root): apt-get install -y "
                       + " ".join(missing))
    log(f"lab: apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    if proc.returncode != 0:  # stale package lists are the usual cause on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    still = _missing_packages()
    if proc.returncode != 0 or still:
        raise LabError(f"apt-get install failed; missing {still or missing}:\n"
                       + proc.stderr[-2000:])


def prepare(log=print, version: str | None = None) -> Kernel:
    """Tools + kernel: everything ``run_in_vm`` needs; cheap when already done."""
    ensure_tools(log)
    return prepare_kernel(log=log, version=version)


# ---------------------------------------------------------------- guest job

#: Environment of every guest process (and kept across the lab's sudo) that only makes the
#: lab faster: eventlet's green DNS resolver (dnspython) is ~45% of the import of
#: oslo.privsep under TCG (2 s of every client, CLI and privsep daemon start); neither the
#: library nor its tests resolve names.
LAB_ONLY_ENV = {"EVENTLET_NO_GREENDNS": "yes"}


def _sudoers_escape(path: str) -> str:
    return "".join("\\" + c if c in "\\,:= " else c for c in path)


def root_helper() -> str:
    """Root helper string the connector gets in the guest (``NVMEOF_MP_ROOT_HELPER``)."""
    return f"sudo {shlex.quote(str(paths.rootwrap_exe()))} {ROOTWRAP_CONF}"


def _write_job(out_dir: Path, argv, env, timeout: int, modprobe_options: dict) -> None:
    """Describe the guest's duties in files in the out share; guest-init.sh acts on them."""
    venv, project, rootwrap = paths.venv_dir(), paths.project_dir(), paths.rootwrap_exe()
    etc = out_dir / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "rootwrap.conf").write_text(
        "[DEFAULT]\n"
        f"filters_path={ROOTWRAP_FILTERS_DIR}\n"
        f"exec_dirs={venv}/bin,{_SBIN_PATH.replace(':', ',')}\n"
        "use_syslog=False\n")
    (etc / "sudoers").write_text(
        f"Defaults env_keep += \"{' '.join(LAB_ONLY_ENV)}\"\n"
        f"{LAB_USER} ALL=(root) NOPASSWD: {_sudoers_escape(str(rootwrap))} {ROOTWRAP_CONF} *\n")
    (etc / "modprobe.conf").write_text(
        "".join(f"options {mod} {opts}\n" for mod, opts in modprobe_options.items()))
    guest_env = {
        "PATH": f"{venv}/bin:{_SBIN_PATH}",
        "VIRTUAL_ENV": str(venv),
        "PYTHONPATH": str(project),
        "PYTHONUNBUFFERED": "1",
        "NVMEOF_MP_ROOT_HELPER": root_helper(),
        "NVMEOF_MP_LAB_OUT": str(out_dir),
        "NVMEOF_MP_LAB_USER": LAB_USER,
        **LAB_ONLY_ENV,
        **(env or {}),
    }
    lines = [f"export {k}={shlex.quote(str(v))}" for k, v in guest_env.items()]
    lines += [
        f"LAB_PROJECT={shlex.quote(str(project))}",
        f"LAB_VENV={shlex.quote(str(venv))}",
        f"LAB_CACHE={shlex.quote(str(paths.lab_dir()))}",
        f"LAB_USER={LAB_USER}",
        f"LAB_ROOTWRAP={shlex.quote(str(rootwrap))}",
        f"LAB_MODULES=({' '.join(GUEST_MODULES)})",
        f"LAB_TIMEOUT={int(timeout)}",
        "LAB_ARGV=(" + " ".join(shlex.quote(str(a)) for a in argv) + ")",
    ]
    (out_dir / "job.sh").write_text("\n".join(lines) + "\n")
    fix = _unreadable_paths([project, venv], {str(paths.lab_dir())}, [out_dir])
    (out_dir / "chmod.list").write_text("".join(p + "\0" for p in fix))


def _unreadable_paths(tops, skip, parents_only=()) -> list[str]:
    """Dirs/files under ``tops`` (and parents of these and ``parents_only``) a user can't read.

    Scanned on the host because walking a venv over 9p under TCG takes ~15 s.
    """
    found = []

    def check(path: str, is_dir: bool) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return
        need = 0o005 if is_dir else 0o004
        if mode & need != need:
            found.append(path)

    for top in [*tops, *parents_only]:
        for parent in reversed(Path(top).parents):
            check(str(parent), True)
    for top in tops:
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != ".git" and os.path.join(root, d) not in skip]
            check(root, True)
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    check(full, False)
    return sorted(set(found))


def _new_out_dir() -> Path:
    runs = paths.lab_dir() / "runs"
    runs.mkdir(exist_ok=True)
    old = sorted(runs.iterdir())
    for stale in old[:-20]:  # keep the last runs for post-mortems, not forever
        if not _in_use(stale):
            shutil.rmtree(stale, ignore_errors=True)
    stem = time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    for n in range(1000):   # several VMs of one process may start in the same second
        path = runs / (stem if n == 0 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise LabError(f"no free run directory {stem} in {runs}")


def _in_use(run_dir: Path, recent: float = 3600) -> bool:
    """A run directory whose console log changed within ``recent`` seconds: a VM (of this
    or another lab process) may still be writing to it."""
    try:
        return time.time() - (run_dir / "console.log").stat().st_mtime < recent
    except OSError:
        return False


def _fsdev_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # qemu option syntax


def qemu_argv(kernel: Kernel, out_dir: Path, *, mem_mb: int, smp: int, kernel_args: str) -> list:
    """The qemu command line (TCG, q35, host root as ro 9p, out dir as rw 9p)."""
    guest_init = paths.package_dir() / "guest-init.sh"
    params = {"nvmeof_lab_out": out_dir, "nvmeof_lab_modules": kernel.modules_dir,
              "nvmeof_lab_init": guest_init}
    for key, val in params.items():
        if any(c.isspace() for c in str(val)):
            raise LabError(f"{key}: path {val} contains whitespace; set NVMEOF_MP_LAB_DIR")
    append = " ".join(["console=ttyS0", "loglevel=5", "panic=-1",
                       *(f"{k}={v}" for k, v in params.items()), kernel_args]).strip()
    return [
        _which("qemu-system-x86_64") or "qemu-system-x86_64",
        # KVM on these hosts cannot run an unmodified kernel: software emulation only.
        "-accel", "tcg,thread=multi", "-cpu", "max", "-machine", "q35",
        "-smp", str(smp), "-m", str(mem_mb),
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-monitor", "none",
        "-kernel", str(kernel.boot_image), "-initrd", str(kernel.initramfs), "-append", append,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={_fsdev_path(out_dir)},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
    ]


def _die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs qemu if we die, even by SIGKILL (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def _pump(stream, log_path: Path, echo: bool, t0: float) -> None:
    """Copy the serial console to the log (host-time stamped) and optionally stdout."""
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            log.write(f"[{time.monotonic() - t0:8.3f}] {line}\n")
            log.flush()
            if echo:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()


def run_in_vm(guest_argv, *, env=None, timeout=600, mem_mb=1536, smp=2, kernel_args="",
              out_dir=None, modprobe_options=None, echo=True, interactive=False,
              kernel_version=None) -> VMResult:
    """Boot the lab VM, run ``guest_argv`` as root in it, power off; never leaves qemu behind.

    ``env`` is added to the guest command's environment (which already has
    NVMEOF_MP_ROOT_HELPER, NVMEOF_MP_LAB_OUT, NVMEOF_MP_LAB_USER and the venv on PATH).
    ``modprobe_options`` ({'nvme_core': 'multipath=N'}) goes to /etc/modprobe.d before the
    modules load; ``kernel_args`` such as ``nvme_core.multipath=N`` work too (modprobe reads
    them from /proc/cmdline).  ``interactive`` (or an empty argv) gives a root shell on the
    terminal instead.  The guest command gets ``timeout`` minus a boot allowance; qemu is
    killed at ``timeout`` whatever happens.  ``kernel_version`` picks the Debian kernel
    (``kernel.SUITES``; default 6.1); its ``uname -r`` goes to ``out_dir/kernel-release``.
    """
    kernel = prepare_kernel(log=print if echo else (lambda *_: None), version=kernel_version)
    out_dir = Path(out_dir) if out_dir else _new_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("guest-rc", "boot-seconds"):
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "kernel-release").write_text(kernel.kver + "\n")
    argv = [] if interactive else list(guest_argv)
    _write_job(out_dir, argv, env, max(30, timeout - 40), modprobe_options or {})
    # Byte-compile on the host: the guest's overlay is thrown away, TCG compiles slowly.
    compileall.compile_dir(str(paths.package_dir().parent), quiet=1)
    cmd = qemu_argv(kernel, out_dir, mem_mb=mem_mb, smp=smp, kernel_args=kernel_args)
    log_path = out_dir / "console.log"
    t0 = time.monotonic()
    timed_out = False
    # SIGTERM/SIGHUP would end Python without running ``finally``: make them exceptions.
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[sig] = signal.signal(sig, _raise_exit)
    if interactive:
        cmd[cmd.index("-serial") + 1] = "chardev:con"
        cmd += ["-chardev", f"stdio,id=con,signal=off,logfile={_fsdev_path(log_path)}"]
        proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
        pump = None
    else:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, echo, t0),
                                daemon=True)
        pump.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pump is not None:
            pump.join(timeout=5)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    seconds = time.monotonic() - t0
    if timed_out:
        msg = f"lab: VM killed after {timeout}s timeout (console: {log_path})"
        print(msg, file=sys.stderr)
    return VMResult(_read_number(out_dir / "guest-rc", int), log_path, out_dir, seconds,
                    timed_out, _read_number(out_dir / "boot-seconds", float))


def _read_number(path: Path, kind):
    try:
        return kind(path.read_text().strip())
    except (OSError, ValueError):
        return None

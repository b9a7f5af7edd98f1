"""Fetch a Debian kernel and build the boot artefacts for the lab VM (host side).

Why this shape: the host kernel cannot load modules, so we boot Debian's own
``linux-image-*-amd64`` in qemu.  The package is only unpacked (``dpkg -x``: no install
hooks), its modules are indexed with ``depmod -b`` and later bind-mounted into the guest.
The xz-compressed bzImage is unpacked once into an ELF ``vmlinux`` (PVH entry) because
decompressing it inside a TCG guest costs seconds on every boot.  Everything is cached in
``lab_dir()/kernel/<package>`` and rebuilt only when missing.
"""

import dataclasses
import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import paths

#: Modules the initramfs needs to reach the 9p root (dependencies are added by modprobe).
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
_READY = "READY"


class LabError(RuntimeError):
    """The lab cannot be set up; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Boot artefacts of one unpacked kernel package."""

    package: str
    kver: str
    root: Path  # dpkg -x target; lib/modules/<kver> is bind-mounted into the guest

    @property
    def vmlinux(self) -> Path:
        return self.root.parent / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.root.parent / "initramfs.cpio.gz"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.kver


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


def kernel_package() -> str:
    """Name of the concrete kernel package apt offers now (``linux-image-X-amd64``)."""

    def ask() -> str | None:
        try:
            out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
        return found[0] if found else None

    name = ask()
    if name is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
        name = ask()
    if name is None:
        raise LabError("apt offers no linux-image-amd64; run 'apt-get update' (as root) first")
    return name


def _cached(base: Path) -> Kernel | None:
    """Newest ready kernel in the cache, so a cached run needs neither apt nor network."""
    ready = sorted(base.glob(f"*/{_READY}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stamp in ready:
        kver = stamp.read_text().strip()
        return Kernel(stamp.parent.name, kver, stamp.parent / "kroot")
    return None


def prepare_kernel(force: bool = False, log=print) -> Kernel:
    """Download/unpack the kernel and build vmlinux + initramfs once; return the cached result.

    ``force`` asks apt again for the current package (e.g. after a Debian point release).
    """
    base = paths.lab_dir() / "kernel"
    base.mkdir(parents=True, exist_ok=True)
    if not force:
        kernel = _cached(base)
        if kernel is not None:
            return _fresh_initramfs(kernel)
    package = kernel_package()
    work = base / package
    if (work / _READY).exists():
        kver = (work / _READY).read_text().strip()
        return _fresh_initramfs(Kernel(package, kver, work / "kroot"))
    work.mkdir(exist_ok=True)
    deb = _download(package, work, log)
    kroot = work / "kroot"
    if kroot.exists():
        shutil.rmtree(kroot)
    log(f"lab: unpacking {deb.name}")
    _run(["dpkg", "-x", str(deb), str(kroot)])
    kvers = [p.name for p in (kroot / "lib" / "modules").iterdir()]
    if len(kvers) != 1:
        raise LabError(f"unexpected module dirs in {deb.name}: {kvers}")
    kernel = Kernel(package, kvers[0], kroot)
    _run(["depmod", "-b", str(kroot), kernel.kver])
    log("lab: extracting uncompressed vmlinux")
    _extract_vmlinux(kroot / "boot" / f"vmlinuz-{kernel.kver}", kernel.vmlinux)
    log("lab: building initramfs")
    build_initramfs(kernel)
    deb.unlink()  # 60+ MiB we no longer need
    (work / _READY).write_text(kernel.kver + "\n")
    return kernel


def _fresh_initramfs(kernel: Kernel) -> Kernel:
    """Rebuild the initramfs when its /init script changed since it was built."""
    script = paths.package_dir() / "initramfs-init.sh"
    if not kernel.initramfs.exists() or kernel.initramfs.stat().st_mtime < script.stat().st_mtime:
        build_initramfs(kernel)
    return kernel


def _download(package: str, work: Path, log) -> Path:
    for old in work.glob("*.deb"):
        old.unlink()
    log(f"lab: apt-get download {package}")
    # apt drops privileges to _apt for downloads; a private cache dir just makes it warn.
    proc = subprocess.run(["apt-get", "download", "-q", package], cwd=work, text=True,
                          capture_output=True)
    debs = list(work.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise LabError(f"apt-get download {package} failed (rc={proc.returncode}):\n"
                       f"{proc.stderr.strip()}\nCheck network access to the Debian mirror "
                       "and run 'apt-get update'.")
    return debs[0]


def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Decompress the xz payload of a bzImage into an ELF vmlinux (qemu boots it via PVH)."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise LabError(f"{vmlinuz} has no xz payload (non-Debian kernel config?)")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise LabError(f"{vmlinuz}: payload is not an ELF image")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    tmp.replace(out)


# ---------------------------------------------------------------- initramfs

class _Cpio:
    """Minimal ``newc`` cpio writer: enough for dirs, files and device nodes."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _static_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if cand and os.path.exists(cand):
            head = Path(cand).read_bytes()[:8192]
            if b"ld-linux" not in head:  # a dynamic busybox names its loader in .interp
                return Path(cand)
    raise LabError("no static busybox found: apt-get install busybox-static")


def _module_files(kernel: Kernel) -> list[Path]:
    """Module files for INITRAMFS_MODULES in load order (dependencies first)."""
    seen: list[Path] = []
    for mod in INITRAMFS_MODULES:
        out = _run(["modprobe", "-d", str(kernel.root), "-S", kernel.kver,
                    "--show-depends", mod]).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in seen:
                seen.append(Path(parts[1]))
    return seen


def build_initramfs(kernel: Kernel) -> Path:
    """Write the busybox initramfs whose /init mounts the host root and switch_roots."""
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lower", "upper", "newroot", "mods"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)  # so the kernel can give /init a console
    cpio.file("bin/busybox", _static_busybox().read_bytes(), 0o755)
    order = []
    for ko in _module_files(kernel):
        data = ko.read_bytes()
        name = ko.name
        if name.endswith(".xz"):  # busybox insmod may not decompress
            data, name = lzma.decompress(data), name[:-3]
        cpio.file(f"mods/{name}", data)
        order.append(name)
    cpio.file("mods/order", ("\n".join(order) + "\n").encode())
    init = (paths.package_dir() / "initramfs-init.sh").read_bytes()
    cpio.file("init", init, 0o755)
    with tempfile.NamedTemporaryFile(dir=kernel.initramfs.parent, delete=False) as tmp:
        tmp.write(gzip.compress(cpio.finish(), compresslevel=1))
    os.replace(tmp.name, kernel.initramfs)
    return kernel.initramfs

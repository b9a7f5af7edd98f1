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
    root: Path  # dpkg -x target; (usr/)lib/modules/<kver> is bind-mounted into the guest

    @property
    def vmlinux(self) -> Path:
        return self.root.parent / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.root.parent / "bzImage"

    @property
    def boot_image(self) -> Path:
        """What qemu ``-kernel`` boots: the unpacked ELF when we could make one (xz bzImage),
        else the bzImage itself (zstd: Python cannot unpack it; the guest does)."""
        return self.vmlinux if self.vmlinux.exists() else self.bzimage

    @property
    def initramfs(self) -> Path:
        return self.root.parent / "initramfs.cpio.gz"

    @property
    def modules_dir(self) -> Path:
        # 6.12 and later ship usr/lib/modules; lib/modules is our symlink to it there
        real = self.root / "usr" / "lib" / "modules" / self.kver
        return real if real.is_dir() else self.root / "lib" / "modules" / self.kver

    @property
    def version(self) -> str:
        return short_version(self.package)


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


# ---------------------------------------------------------------- which kernel, from where

#: short kernel version -> the Debian suite whose ``linux-image-amd64`` has it
SUITES = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie", "7.2": "sid"}
#: the kernel the lab boots unless told otherwise (the host suite's, Debian 12)
DEFAULT_VERSION = "6.1"
_HOST_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def short_version(package: str) -> str:
    """``linux-image-6.12.117+deb13-amd64`` -> ``6.12``."""
    found = re.match(r"linux-(?:image|binary|modules)-(\d+\.\d+)", package)
    if not found:
        raise LabError(f"not a versioned kernel package: {package}")
    return found.group(1)


def suite_for(version: str) -> str:
    try:
        return SUITES[version]
    except KeyError:
        raise LabError(f"unknown kernel {version!r}; choose one of "
                       + ", ".join(SUITES)) from None


def _deb822_stanzas(text: str):
    stanza: dict = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[:1] in " \t" and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def _is_main_suite(suite: str) -> bool:
    """A plain release suite (``bookworm``), not ``-security``/``-updates``/``-backports``."""
    return bool(suite) and "-" not in suite and "/" not in suite


def archive_uri(deb822_texts=(), list_texts=()) -> str:
    """The URI the host's apt uses for the Debian main archive.

    ``deb822_texts``: contents of ``sources.list.d/*.sources``; ``list_texts``: one-line
    ``sources.list`` files.  The first ``deb`` entry of a plain release suite with the
    ``main`` component wins (security and updates archives are separate URIs).
    """
    for text in deb822_texts:
        for st in _deb822_stanzas(text):
            if st.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in st.get("types", "").split():
                continue
            if "main" not in st.get("components", "").split():
                continue
            if any(_is_main_suite(s) for s in st.get("suites", "").split()):
                uris = st.get("uris", "").split()
                if uris:
                    return uris[0].rstrip("/")
    for text in list_texts:
        for line in text.splitlines():
            line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 4 and line[0] == "deb" and _is_main_suite(line[2]) \
                    and "main" in line[3:]:
                return line[1].rstrip("/")
    raise LabError("no Debian main archive in the host's apt sources")


def host_archive_uri(etc: Path = Path("/etc/apt")) -> str:
    deb822 = [p.read_text() for p in sorted((etc / "sources.list.d").glob("*.sources"))]
    lists = [p.read_text() for p in [etc / "sources.list",
                                      *sorted((etc / "sources.list.d").glob("*.list"))]
             if p.exists()]
    return archive_uri(deb822, lists)


def host_suite(os_release: Path = Path("/etc/os-release")) -> str | None:
    try:
        text = os_release.read_text()
    except OSError:
        return None
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return found.group(1) if found else None


def private_sources(uri: str, suite: str, keyring: Path = _HOST_KEYRING) -> str:
    """A one-line sources.list for ``suite`` of the archive at ``uri``."""
    return f"deb [signed-by={keyring}] {uri} {suite} main\n"


def apt_options(apt_dir: Path) -> list[str]:
    """apt-get/apt-cache options that confine apt to the private config in ``apt_dir``."""
    return ["-o", f"Dir::Etc::sourcelist={apt_dir / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
            "-o", f"Dir::State::status={apt_dir / 'status'}",
            "-o", f"Dir::Cache={apt_dir / 'cache'}",
            "-o", "APT::Sandbox::User=root"]


class AptSource:
    """apt for one suite: the host's own apt for the host's suite, else a private config
    under the lab cache (own sources list, lists and cache), so the host's apt is untouched."""

    def __init__(self, version: str):
        self.version = version
        self.suite = suite_for(version)
        self.options: list[str] = []
        self.apt_dir: Path | None = None
        if self.suite != host_suite():
            self.apt_dir = paths.lab_dir() / "apt" / self.suite
            self.options = apt_options(self.apt_dir)

    def _update(self) -> None:
        if self.apt_dir is None:
            if os.geteuid() == 0:
                subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
            return
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.apt_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.apt_dir / "status").touch()
        (self.apt_dir / "sources.list").write_text(
            private_sources(host_archive_uri(), self.suite))
        proc = subprocess.run(["apt-get", *self.options, "update", "-q"], text=True,
                              capture_output=True)
        if proc.returncode != 0:
            raise LabError(f"apt-get update for {self.suite} failed:\n{proc.stderr[-2000:]}")

    def depends(self, package: str) -> str | None:
        try:
            return _run(["apt-cache", *self.options, "depends", package]).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    def resolve(self) -> list[str]:
        """Concrete packages to fetch: the image package (+ its binary/modules parts)."""
        out = self.depends("linux-image-amd64")
        image = image_package(out or "", self.version)
        if image is None:
            self._update()
            out = self.depends("linux-image-amd64")
            image = image_package(out or "", self.version)
        if image is None:
            raise LabError(f"apt offers no linux-image-amd64 with kernel {self.version} in "
                           f"{self.suite}; run 'apt-get update' (as root) first")
        return [image, *companion_packages(self.depends(image) or "", image)]

    def download(self, package: str, work: Path) -> Path:
        proc = subprocess.run(["apt-get", *self.options, "download", "-q", package],
                              cwd=work, text=True, capture_output=True)
        debs = list(work.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise LabError(f"apt-get download {package} failed (rc={proc.returncode}):\n"
                           f"{proc.stderr.strip()}\nCheck network access to the Debian "
                           "mirror and run 'apt-get update'.")
        return debs[0]


def image_package(depends_out: str, version: str) -> str | None:
    """From ``apt-cache depends linux-image-amd64``: its ``linux-image-X-amd64`` if X is
    ``version`` (a suite's meta package may have moved on)."""
    for name in re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", depends_out):
        if short_version(name) == version:
            return name
    return None


def companion_packages(depends_out: str, image: str) -> list[str]:
    """Since 7.x the image package is a meta package: its ``linux-binary-``/``linux-modules-``
    dependencies of the same release hold the bzImage and the modules."""
    suffix = image[len("linux-image-"):]
    found = re.findall(r"Depends:\s*(linux-(?:binary|modules)-[^\s]+)", depends_out)
    return sorted({n for n in found if n.split("-", 2)[2] == suffix})


def _cached(base: Path, version: str) -> Kernel | None:
    """Newest ready kernel of ``version`` in the cache: a cached run needs neither apt nor
    network."""
    ready = sorted(base.glob(f"linux-image-{version}[.-]*/{_READY}"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for stamp in ready:
        kver = stamp.read_text().strip()
        return Kernel(stamp.parent.name, kver, stamp.parent / "kroot")
    return None


def prepare_kernel(force: bool = False, log=print, version: str | None = None) -> Kernel:
    """Download/unpack the kernel and build the boot image + initramfs once; return the
    cached result.  ``version`` is a short kernel version (``SUITES``), default 6.1.

    ``force`` asks apt again for the current package (e.g. after a Debian point release).
    """
    version = version or DEFAULT_VERSION
    suite_for(version)
    base = paths.lab_dir() / "kernel"
    base.mkdir(parents=True, exist_ok=True)
    if not force:
        kernel = _cached(base, version)
        if kernel is not None:
            return _fresh_initramfs(kernel)
    apt = AptSource(version)
    packages = apt.resolve()
    package = packages[0]
    work = base / package
    if (work / _READY).exists():
        kver = (work / _READY).read_text().strip()
        return _fresh_initramfs(Kernel(package, kver, work / "kroot"))
    work.mkdir(exist_ok=True)
    for old in work.glob("*.deb"):
        old.unlink()
    debs = []
    for name in packages:
        log(f"lab: apt-get download {name} ({apt.suite})")
        debs.append(apt.download(name, work))
    kroot = work / "kroot"
    if kroot.exists():
        shutil.rmtree(kroot)
    for deb in debs:
        log(f"lab: unpacking {deb.name}")
        _run(["dpkg", "-x", str(deb), str(kroot)])
    kernel = Kernel(package, _unpacked_kver(kroot, package), kroot)
    _run(["depmod", "-b", str(kroot), kernel.kver])
    _boot_image(kernel, log)
    log("lab: building initramfs")
    build_initramfs(kernel)
    for deb in debs:
        deb.unlink()  # 60+ MiB we no longer need
    (work / _READY).write_text(kernel.kver + "\n")
    return kernel


def _unpacked_kver(kroot: Path, package: str) -> str:
    """The one ``<kver>`` module dir; links ``lib/modules`` to ``usr/lib/modules`` where the
    package ships only the latter (depmod/modprobe ``-b``/``-d`` look in lib/modules)."""
    usr_mods, lib_mods = kroot / "usr" / "lib" / "modules", kroot / "lib" / "modules"
    if usr_mods.is_dir() and not lib_mods.exists():
        lib_mods.parent.mkdir(parents=True, exist_ok=True)
        lib_mods.symlink_to("../usr/lib/modules")
    kvers = [p.name for p in lib_mods.iterdir()] if lib_mods.is_dir() else []
    if len(kvers) != 1:
        raise LabError(f"unexpected module dirs in {package}: {kvers}")
    return kvers[0]


def _boot_image(kernel: Kernel, log) -> None:
    """ELF vmlinux from an xz bzImage, else the bzImage as it is (qemu boots both)."""
    kroot = kernel.root
    cands = [kroot / "boot" / f"vmlinuz-{kernel.kver}", kernel.modules_dir / "vmlinuz"]
    vmlinuz = next((c for c in cands if c.is_file()), None)
    if vmlinuz is None:
        raise LabError(f"{kernel.package}: no vmlinuz in {[str(c) for c in cands]}")
    try:
        log("lab: extracting uncompressed vmlinux")
        _extract_vmlinux(vmlinuz, kernel.vmlinux)
    except LabError as exc:
        log(f"lab: {exc}; qemu boots the bzImage")
        shutil.copyfile(vmlinuz, kernel.bzimage)


def _fresh_initramfs(kernel: Kernel) -> Kernel:
    """Rebuild the initramfs when its /init script changed since it was built."""
    script = paths.package_dir() / "initramfs-init.sh"
    if not kernel.initramfs.exists() or kernel.initramfs.stat().st_mtime < script.stat().st_mtime:
        build_initramfs(kernel)
    return kernel


def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Decompress the xz payload of a bzImage into an ELF vmlinux (qemu boots it via PVH)."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise LabError(f"{vmlinuz.name} has no xz payload")
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
        try:
            out = _run(["modprobe", "-d", str(kernel.root), "-S", kernel.kver,
                        "--show-depends", mod]).stdout
        except subprocess.CalledProcessError:
            # 7.x ships modules.builtin.bin only: modprobe fails on a built-in module
            if mod in _builtin_modules(kernel):  # modprobe -d could not say "builtin"
                continue
            raise
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in seen:
                seen.append(Path(parts[1]))
    return seen


def _builtin_modules(kernel: Kernel) -> set[str]:
    """INITRAMFS_MODULES with no module file: built in (modules.builtin.bin is a trie)."""
    files = {p.name.split(".ko")[0].replace("-", "_")
             for p in kernel.modules_dir.rglob("*.ko*")}
    return {m for m in INITRAMFS_MODULES if m.replace("-", "_") not in files}


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

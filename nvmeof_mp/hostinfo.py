"""What the host is: its NVMe identity and capabilities (read-only, cheap, lazy).

Reads happen without root where Linux allows it (/etc/nvme/hostnqn, the nvme_core parameter,
/proc/self/mountinfo, /dev/disk/by-uuid); only missing identity files and the root-only DMI
UUID go through the privileged ``Kernel``.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import socket

from nvmeof_mp.names import SYSTEM_UUID_CACHE
from nvmeof_mp.topology import listdir, read_attr

LOG = logging.getLogger(__name__)      # plain logging: ``nvmeof-mp properties`` loads no oslo




def _valid_uuid(value):
    import uuid
    try:
        u = uuid.UUID((value or "").strip())
    except ValueError:
        return None
    return None if u.int == 0 else str(u)


def kernel_release(root="/"):
    """The running kernel's release (``6.1.0-56-amd64``), as ``root``'s /proc shows it."""
    try:
        with open(os.path.join(root, "proc/sys/kernel/osrelease")) as f:
            return f.read().strip()
    except OSError:
        return platform.release()


def release_tuple(release):
    """``5.10.0-32-amd64`` -> (5, 10); ``6.12.117+deb13-amd64`` -> (6, 12)."""
    major, minor = release.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


#: Linux 5.11 added the fabrics option fast_io_fail_tmo; before it the option is refused
#: (EINVAL) and I/O on a reconnecting controller queues until ctrl_loss_tmo gives it up.
FAST_IO_FAIL_SINCE = (5, 11)


def has_fast_io_fail(root="/"):
    """Does this kernel's fabrics driver take ``fast_io_fail_tmo``?  (An unreadable release
    counts as a current kernel: the option is then tried, as before.)"""
    try:
        return release_tuple(kernel_release(root)) >= FAST_IO_FAIL_SINCE
    except (ValueError, AttributeError):
        return True


def host_authenticates(root="/", release=None):
    """Does this kernel's NVMe host speak DH-HMAC-CHAP (NVME_HOST_AUTH)?  nvme_auth is then
    loaded with nvme_core, built in, or (nvme_core not loaded yet: the first attach after
    boot) among the kernel's modules, which nvme_core loads.  Without it Linux takes
    ``dhchap_secret=`` and ignores it: the connect succeeds unauthenticated (Debian's 6.1)."""
    if os.path.isdir(os.path.join(root, "sys/module/nvme_auth")):
        return True
    release = release or kernel_release(root)
    for base in ("lib/modules", "usr/lib/modules"):
        for index in ("modules.builtin", "modules.dep"):
            try:
                with open(os.path.join(root, base, release, index)) as f:
                    if "/nvme-auth.ko" in f.read():
                        return True
            except OSError:
                pass
    return False


class HostInfo:
    def __init__(self, root="/", sys_root=None, kernel=None):
        self.root = root
        self.sys_root = sys_root or os.path.join(root, "sys")
        self.kernel = kernel

    def _path(self, *parts):
        return os.path.join(self.root, *parts)

    def native_multipath(self):
        """nvme_core's ``multipath`` parameter: ``Y`` -> True; ``N`` or absent -> False."""
        return read_attr(os.path.join(self.sys_root,
                                      "module/nvme_core/parameters/multipath")) == "Y"

    def read_identity(self):
        """(hostnqn, hostid) from /etc/nvme, None for what is missing."""
        return (_read(self._path("etc/nvme/hostnqn")), _read(self._path("etc/nvme/hostid")))

    def identity(self):
        """(hostnqn, hostid), creating the files once through the privileged side if needed."""
        nqn, hostid = self.read_identity()
        if (nqn and hostid) or self.kernel is None:
            return nqn, hostid
        return self.kernel.ensure_host_identity()

    def system_uuid(self):
        """DMI product UUID: read directly when allowed (root), else from the copy the
        privileged side leaves in /run (world-readable, it is no secret), else ask it."""
        for path in ("sys/class/dmi/id/product_uuid", SYSTEM_UUID_CACHE.lstrip("/")):
            value = _valid_uuid(_read(self._path(path)))
            if value:
                return value
        if self.kernel is not None:
            return self.kernel.read_system_uuid()
        return None

    def root_fs_uuid(self):
        """UUID of the filesystem mounted at / (what os-brick reports as ``uuid``)."""
        source = None
        for line in (_read(self._path("proc/self/mountinfo")) or "").splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/" and " - " in line:
                source = line.split(" - ", 1)[1].split()[1]
        if not source or not source.startswith("/dev/"):
            return None     # overlay, tmpfs, 9p: no filesystem UUID
        by_uuid = self._path("dev/disk/by-uuid")
        real = os.path.realpath(source)
        for name in listdir(by_uuid):
            if os.path.realpath(os.path.join(by_uuid, name)) == real:
                return name
        return None

    def tool(self, name):
        return shutil.which(name) is not None

    def multipathd_running(self):
        return os.path.exists(self._path("run/multipathd.pid")) or os.path.exists(
            self._path("run/multipathd/multipathd.pid"))


def connector_properties(info: HostInfo, multipath=False, enforce_multipath=False, host=None):
    """The dict Nova hands Cinder: os-brick's generic keys plus its NVMe-oF keys, plus ours."""
    props = {
        "platform": platform.machine(),
        "os_type": platform.system().lower(),
        "ip": _my_ip(),
        "host": host or socket.gethostname(),
        "multipath": bool(multipath),
        "enforce_multipath": bool(enforce_multipath),
        "nvme_native_multipath": info.native_multipath(),
    }
    # os-brick gathers every connector's properties in one loop, so one that raises breaks
    # every protocol's attach: what cannot be learned (the daemon does not start, no system
    # UUID) is logged and left out.
    nqn, hostid = _learn("host NQN and host ID", info.identity) or (None, None)
    if nqn:
        props["nqn"] = nqn
    if hostid:
        props["nvme_hostid"] = hostid
    uuid = _learn("root filesystem UUID", info.root_fs_uuid)
    if uuid:
        props["uuid"] = uuid
    suuid = _learn("system UUID", info.system_uuid)
    if suuid:
        props["system uuid"] = suuid
    props["nvmeof_mp"] = {
        "modes": supported_modes(info, props["nvme_native_multipath"]),
        "mdadm": info.tool("mdadm"),
        "dmsetup": info.tool("dmsetup"),
        "multipathd": info.multipathd_running(),
        "nvme_cli": info.tool("nvme"),
    }
    return props


def _learn(what, fn):
    try:
        return fn()
    except Exception as e:      # noqa: BLE001 - whatever a privileged call or a read raises
        LOG.warning("Connector properties without the %s: %s: %s", what, type(e).__name__, e)
        return None


def supported_modes(info: HostInfo, native):
    modes = ["single"]
    if native:
        modes.append("multipath")
    if info.tool("mdadm"):
        modes.append("raid")
    if info.tool("dmsetup"):
        modes.append("dm")
    return modes


def _my_ip():
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))   # TEST-NET address: nothing is sent
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _read(path):
    return read_attr(path) or None

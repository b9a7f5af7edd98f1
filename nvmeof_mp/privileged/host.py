"""Privileged host entrypoints: the host NQN / host ID files and flushing a block device."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
import uuid as uuidlib

from nvmeof_mp import names, privileged, threads
from nvmeof_mp.names import SYSTEM_UUID_CACHE
from nvmeof_mp.exception import PrivilegedArgumentError

NVME_ETC = "/etc/nvme"
_BLKFLSBUF = 0x1261
# Only our own kinds of block devices may be flushed.
_DEVICE_RE = re.compile(r"^/dev/(%s|%s|md/%s|dm-\d+|mapper/%s)$" % (
    names.NAMESPACE, names.MD_DEVICE, names.MD_NAME, names.DM_NAME))


def system_uuid_sources(root="/"):
    return [os.path.join(root, "sys/class/dmi/id/product_uuid"),
            os.path.join(root, "etc/machine-id")]


def derive_host_identity(root="/"):
    """A stable (host NQN, host ID) from the system UUID, or the machine-id when there is none.

    Stable matters: a new random NQN per call would make targets forget the host.
    """
    for path in system_uuid_sources(root):
        try:
            with open(path) as f:
                raw = f.read().strip()   # product_uuid ends with a newline (os-brick bug 1939467)
        except OSError:
            continue
        try:
            value = str(uuidlib.UUID(raw))
        except ValueError:
            continue
        if path.endswith("machine-id"):
            value = str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, "nvmeof_mp:" + value))
        return "nqn.2014-08.org.nvmexpress:uuid:" + value, value
    raise OSError("no system UUID or machine-id to derive a host NQN from")


def ensure_identity_files(root="/"):
    """Create /etc/nvme/hostnqn and hostid once if missing; return what they hold."""
    etc = os.path.join(root, NVME_ETC.lstrip("/"))
    nqn_path, id_path = os.path.join(etc, "hostnqn"), os.path.join(etc, "hostid")
    existing = {}
    for key, path in (("nqn", nqn_path), ("id", id_path)):
        try:
            with open(path) as f:
                existing[key] = f.read().strip() or None
        except OSError:
            existing[key] = None
    if existing["nqn"] and existing["id"]:
        return existing["nqn"], existing["id"]
    nqn, hostid = derive_host_identity(root)
    if existing["nqn"] and existing["nqn"].startswith("nqn.2014-08.org.nvmexpress:uuid:"):
        hostid = existing["nqn"].rsplit(":", 1)[1]     # keep the two consistent
    os.makedirs(etc, exist_ok=True)
    for value, path, old in ((nqn, nqn_path, existing["nqn"]),
                             (hostid, id_path, existing["id"])):
        if not old:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(value + "\n")
            os.replace(tmp, path)
    return existing["nqn"] or nqn, existing["id"] or hostid


@privileged.default.entrypoint
def ensure_host_identity():
    return ensure_identity_files("/")




@privileged.default.entrypoint
def read_system_uuid():
    """The DMI product UUID is readable by root only; leave a world-readable copy in /run so
    unprivileged callers need no daemon for it next time (it is no secret)."""
    try:
        value = derive_host_identity("/")[1]
    except OSError:
        return None
    try:
        os.makedirs(os.path.dirname(SYSTEM_UUID_CACHE), mode=0o755, exist_ok=True)
        with open(SYSTEM_UUID_CACHE + ".tmp", "w") as f:
            f.write(value + "\n")
        os.chmod(SYSTEM_UUID_CACHE + ".tmp", 0o644)
        os.replace(SYSTEM_UUID_CACHE + ".tmp", SYSTEM_UUID_CACHE)
    except OSError:
        pass
    return value


def device_path(path):
    if not isinstance(path, str) or not _DEVICE_RE.fullmatch(path) or ".." in path:
        raise PrivilegedArgumentError("not a device this library manages: %r" % (path,))
    return path


FLUSH_TIMEOUT = 30.0
_IN_FLIGHT = set()          # device paths with a flush that has not returned yet
_IN_FLIGHT_LOCK = threading.Lock()


def flush_timeout(value):
    if value is None:
        return FLUSH_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise PrivilegedArgumentError("flush timeout must be a number in (0, 3600]")
    return float(value)


@privileged.default.entrypoint
def read_first_sector(path):
    """Can root read the device?  (``check_valid_device(run_as_root=True)``: Cinder's service
    user may not open it.)  None, or the reason it cannot; bounded in time."""
    from nvmeof_mp import blockdev
    if not isinstance(path, str) or not path.startswith("/dev/") or "\x00" in path:
        raise PrivilegedArgumentError("not a device path: %r" % (path,))
    return blockdev.read_first_sector(device_path(os.path.realpath(path)))


@privileged.default.entrypoint
def flush_device(path, timeout=None):
    """Write back and drop the buffer cache of a block device before it goes away; give up
    after ``timeout`` seconds (see ``bounded_flush``)."""
    return bounded_flush(device_path(path), flush_timeout(timeout))


def bounded_flush(path, timeout):
    """Flush in a thread of its own and wait at most ``timeout`` seconds for it.

    A flush into a device no path can serve does not fail, it queues (dm queue_if_no_path,
    a controller reconnecting with ctrl_loss_tmo -1), and the thread doing it cannot be
    interrupted.  The daemon's worker returns an error instead of waiting with it; the stuck
    thread ends when its I/O fails (the controllers are deleted, the map stops queueing).  A
    device keeps at most one stuck flush: a retry while one is blocked fails at once.
    """
    with _IN_FLIGHT_LOCK:
        if path in _IN_FLIGHT:
            return "flush %s: an earlier flush is still blocked (no path serves its I/O)" % path
        _IN_FLIGHT.add(path)

    def run():
        try:
            return _flush(path)
        finally:
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.discard(path)
    try:
        finished, error = threads.run_with_deadline(run, timeout, "flush")
    except Exception as e:          # noqa: BLE001 - reported, never lost in a thread
        return "flush %s: %s" % (path, e)
    if not finished:
        return "flush %s: no answer after %gs (its I/O is queued: no path serves it)" % (
            path, timeout)
    return error


def _flush(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return "open %s: %s" % (path, e.strerror)
    try:
        os.fsync(fd)
        fcntl.ioctl(fd, _BLKFLSBUF, 0)
    except OSError as e:
        return "flush %s: %s" % (path, e.strerror)
    finally:
        os.close(fd)
    return None


SYS = "/sys"                       # the sysfs root (tests point it at a fake tree)
FABRICS_TRANSPORTS = ("tcp", "rdma")     # what this library connects
_NAMESPACE_RE = re.compile("^%s$" % names.NAMESPACE)


def controller_transport(ctrl_dir):
    """A controller's transport (``tcp``, ``rdma``, ``pcie``...), None when it is gone."""
    try:
        with open(os.path.join(ctrl_dir, "transport")) as f:
            return f.read().strip()
    except OSError:
        return None


def namespace_controllers(name):
    """{controller name: transport} of an nvmeXnY block device: its own controller, or with
    native multipath every controller of the subsystem its head belongs to."""
    block = os.path.realpath(os.path.join(SYS, "class/block", name))
    parent = os.path.dirname(block)
    pname = os.path.basename(parent)
    if not os.path.isdir(block):
        return {}
    if pname.startswith("nvme-subsys"):
        sdir = os.path.join(SYS, "class/nvme-subsystem", pname)
        try:
            entries = os.listdir(sdir)
        except OSError:
            return {}
        return {c: controller_transport(os.path.join(sdir, c)) for c in sorted(entries)
                if re.fullmatch(names.CONTROLLER, c)}
    return {pname: controller_transport(parent)} if re.fullmatch(names.CONTROLLER, pname) else {}


def fabrics_namespace(device):
    """``/dev/nvmeXnY`` if the namespace is reached over fabrics only (every controller
    behind it is tcp or rdma): never a local PCIe disk, whatever the sysfs path looks like
    (with native multipath PCIe namespaces live under nvme-subsystem too)."""
    if not isinstance(device, str):
        raise PrivilegedArgumentError("not a namespace: %r" % (device,))
    name = device[len("/dev/"):] if device.startswith("/dev/") else device
    if not _NAMESPACE_RE.fullmatch(name):
        raise PrivilegedArgumentError("not an NVMe namespace: %r" % (device,))
    ctrls = namespace_controllers(name)
    if not ctrls or any(t not in FABRICS_TRANSPORTS for t in ctrls.values()):
        raise PrivilegedArgumentError(
            "/dev/%s is not an NVMe-oF namespace (controllers: %s)" % (
                name, ", ".join("%s=%s" % kv for kv in ctrls.items()) or "none"))
    return "/dev/" + name


def fabrics_devnum(devnum):
    """``major:minor`` if it is a block device ``fabrics_namespace`` accepts (dm tables name
    their paths by number)."""
    if not isinstance(devnum, str) or not re.fullmatch(r"\d{1,4}:\d{1,7}", devnum):
        raise PrivilegedArgumentError("not a major:minor: %r" % (devnum,))
    fabrics_namespace(os.path.basename(os.path.realpath(os.path.join(SYS, "dev/block", devnum))))
    return devnum


# -- is a namespace open exclusively? ------------------------------------------------------

EXCLUSIVE_TIMEOUT = 5.0
EXCLUSIVE_MAX_DEVICES = 256
BUSY = "open exclusively or held by another user"
_OPENING = set()            # devices with an exclusive open that has not returned yet
_OPENING_LOCK = threading.Lock()
LOG = logging.getLogger(__name__)


@privileged.default.entrypoint
def exclusive_busy(devices):
    """{device: reason} for the NVMe-oF namespaces of ``devices`` (``/dev/nvmeXnY`` paths, at
    most ``EXCLUSIVE_MAX_DEVICES``) that something on this host holds: mounted, stacked on
    (md, dm, LVM), swap, or open with O_EXCL by a process.  Namespaces not busy are left out.

    Every device is checked first (``fabrics_namespace``: never a local disk or a PCIe
    namespace); one refused refuses the call before any device is opened.  Bounded in time:
    see ``busy_devices`` (``EXCLUSIVE_TIMEOUT`` seconds).
    """
    if not isinstance(devices, (list, tuple)) or len(devices) > EXCLUSIVE_MAX_DEVICES:
        raise PrivilegedArgumentError("not a list of at most %d devices" % EXCLUSIVE_MAX_DEVICES)
    for device in devices:
        if not isinstance(device, str) or not device.startswith("/dev/"):
            raise PrivilegedArgumentError("not a device path: %r" % (device,))
        fabrics_namespace(device)
    return busy_devices(devices, EXCLUSIVE_TIMEOUT)


def busy_devices(devices, timeout):
    """{path: reason} for the block devices of ``devices`` an exclusive open fails on.

    Each is opened ``O_RDONLY|O_EXCL|O_NONBLOCK|O_CLOEXEC`` and closed at once; all opens run
    together in threads of their own, and the answer comes within ``timeout`` seconds:

    * EBUSY: ``BUSY`` (the kernel refuses an exclusive open of a device that is mounted,
      has a holder, is swap or open with O_EXCL, or whose partition is);
    * an open that has not returned by then: ``open did not return within <timeout>s`` (an
      open may do I/O, which queues while no path serves the namespace); its thread goes on
      and closes the device when the open returns, and until then a new call reports
      ``an earlier open has not returned yet`` without opening it again;
    * any other error (ENXIO, ENOENT...): not busy, logged as a warning.
    """
    devices = list(dict.fromkeys(devices))
    with _OPENING_LOCK:
        stuck = {d for d in devices if d in _OPENING}
        todo = [d for d in devices if d not in stuck]
        _OPENING.update(todo)
    answers = {}

    def probe(device):
        try:
            answers[device] = _exclusive_open(device)
        finally:
            with _OPENING_LOCK:
                _OPENING.discard(device)

    def probe_all():
        if len(todo) == 1:
            return probe(todo[0])
        workers = [threading.Thread(target=probe, args=(d,), name="nvmeof-exclusive",
                                    daemon=True) for d in todo]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if todo:
        threads.run_with_deadline(probe_all, timeout, "exclusive")
    answers = dict(answers)
    busy = {}
    for device in devices:
        if device in stuck:
            busy[device] = "an earlier open has not returned yet"
        elif device not in answers:
            busy[device] = "open did not return within %gs" % timeout
        elif answers[device]:
            busy[device] = answers[device]
    return busy


def _exclusive_open(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return BUSY
        LOG.warning("exclusive open of %s: %s (not counted as in use)", path, e.strerror)
        return None
    os.close(fd)
    return None

"""Privileged NVMe entrypoints: connect a portal, delete / rescan a controller, tune it.

Each function runs inside the privsep daemon as root and re-validates what it is given: the
daemon must not trust its caller.  Results are plain dicts (privsep serialises them), errors of
the kernel are returned, not raised, so the caller sees errno and text unchanged.
"""

from __future__ import annotations

import ctypes
import errno as errnolib
import fcntl
import json
import os
import re
import struct

from nvmeof_mp import connection
from nvmeof_mp import privileged
from nvmeof_mp.privileged import host
from nvmeof_mp.privileged import tools
from nvmeof_mp import names, threads
from nvmeof_mp.names import TUNABLE_ATTRS
from nvmeof_mp.exception import InvalidConnectionInfo, PrivilegedArgumentError

FABRICS_DEV = "/dev/nvme-fabrics"
SYS_CLASS_NVME = "/sys/class/nvme"
SYS_CLASS_NET = "/sys/class/net"
_CTRL_RE = re.compile("^%s$" % names.CONTROLLER)
_HOSTID_RE = re.compile(r"^[0-9a-fA-F-]{32,36}$")
#: seconds an ``nvme connect`` may take (connect_method = nvme-cli)
CLI_TIMEOUT = 120
# nvme-cli spells "already connected" in several ways across versions (1.x: exit 114 or 70,
# 2.x: exit 1 and a message, sometimes with a typo).
_ALREADY_EXITS = (114, 70)
_ALREADY_TEXTS = ("already connected", "already connnected")
CONNECT_METHODS = ("nvme-cli", "fabrics")
MAX_PORTALS = 16            # per connect_portals call: more is not one volume's attach
# The kernel creates fabrics controllers one at a time (one global mutex around every write to
# /dev/nvme-fabrics) and does not wake its waiters in order.  Left to it, eight volumes'
# sixteen writes interleave and every volume waits for nearly the last controller of all.
# Our writes queue here instead: one call's portals back to back, calls in arrival order, so
# the first volume asked for is ready first and its discovery overlaps the next connects.
_FABRICS_TURN = threads.FifoLock()


def connect_options(opts):
    """Validate a connect request and return it normalised (used on both sides of privsep)."""
    if not isinstance(opts, dict):
        raise PrivilegedArgumentError("connect options must be a dict")
    try:
        nqn = connection.validate_nqn(opts.get("nqn"), "nqn")
        portal = connection.validate_portal(
            (opts.get("traddr"), opts.get("trsvcid"), opts.get("transport")), "portal")
        host_nqn = opts.get("host_nqn")
        if host_nqn is not None:
            connection.validate_nqn(host_nqn, "host_nqn")
    except InvalidConnectionInfo as e:
        raise PrivilegedArgumentError(str(e))
    scope = portal.traddr.partition("%")[2]
    if scope and not scope.isdigit() and scope not in _interfaces():
        raise PrivilegedArgumentError("IPv6 scope ID %r is not an interface of this host"
                                      % scope)
    host_id = opts.get("host_id")
    if host_id is not None and not _HOSTID_RE.fullmatch(str(host_id)):
        raise PrivilegedArgumentError("host_id is not a UUID")
    out = {"nqn": nqn, "traddr": portal.traddr, "trsvcid": portal.trsvcid,
           "transport": portal.transport, "host_nqn": host_nqn, "host_id": host_id}
    for key in ("ctrl_loss_tmo", "reconnect_delay", "fast_io_fail_tmo", "keep_alive_tmo",
                "nr_io_queues"):
        value = opts.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 86400:
                raise PrivilegedArgumentError("%s must be an integer in -1..86400" % key)
        out[key] = value
    for key in connection.SECRET_KEYS:
        value = opts.get(key)
        if value is not None and not connection.valid_secret(value):
            raise PrivilegedArgumentError("%s is malformed" % key)   # never echo a secret
        out[key] = value
    return out


def _interfaces():
    try:
        return set(os.listdir(SYS_CLASS_NET))
    except OSError:
        return set()


def controller_name(name):
    if not isinstance(name, str) or not _CTRL_RE.fullmatch(name):
        raise PrivilegedArgumentError("not a controller name: %r" % (name,))
    return name


def fabrics_controller(name):
    """``name`` if it is a controller over a fabrics transport we connect: never a local PCIe
    disk's controller (nor one that is gone)."""
    name = controller_name(name)
    transport = host.controller_transport(os.path.join(SYS_CLASS_NVME, name))
    if transport not in host.FABRICS_TRANSPORTS:
        raise PrivilegedArgumentError("%s is not a fabrics controller (transport %s)"
                                      % (name, transport))
    return name


@privileged.default.entrypoint
def connect_portal(opts, method="nvme-cli", hold=None):
    """Create one fabrics controller.  Returns {'controller': 'nvmeN'} or {'error', 'errno',
    'already'}.  fast_io_fail_tmo is applied in the same call when the tool lacks the option.
    ``hold``: see ``connect_portals``.
    """
    return connect_many([opts], method, hold)[0]


@privileged.default.entrypoint
def connect_portals(opts_list, method="nvme-cli", hold=None):
    """Create one controller per portal of one attach: one privileged call instead of one
    per portal.  Every option set is validated before anything is connected; fabrics writes
    queue first-come first-served (``_FABRICS_TURN``), nvme-cli processes run concurrently;
    replies come in the order given, as connect_portal's.
    ``hold``: ``registry.hold``'s arguments (the volume's reference to the subsystem and its
    "attaching" record), written first, after the options are validated: the record is on
    disk before the first controller exists, and an attach costs no extra round trip."""
    return connect_many(opts_list, method, hold)


def connect_many(opts_list, method, hold=None):
    if not isinstance(opts_list, (list, tuple)) or not 1 <= len(opts_list) <= MAX_PORTALS:
        raise PrivilegedArgumentError("between 1 and %d portals per call" % MAX_PORTALS)
    validated = [connect_options(o) for o in opts_list]
    method = connect_method(method)
    if hold is not None:
        from nvmeof_mp.privileged import registry
        registry.hold_checked(hold)
    if all(_via_fabrics(o, method) for o in validated):
        with _FABRICS_TURN:     # the kernel would serialize these writes anyway
            return [_connect(o, method) for o in validated]
    # nvme-cli processes: their start-up and parsing overlap, only their writes queue
    return threads.map_concurrently("privileged-connect", lambda o: _connect(o, method),
                                    validated)


def connect_method(method):
    if method not in CONNECT_METHODS:
        raise PrivilegedArgumentError("unknown connect method %r" % (method,))
    return method


def _has_secret(opts):
    return bool(opts.get("dhchap_secret") or opts.get("dhchap_ctrl_secret"))


def _via_fabrics(opts, method):
    """Is this connect one write to /dev/nvme-fabrics (not an nvme-cli process)?  Secrets
    always go this way: nvme-cli would show them in the process list."""
    return (method == "fabrics" or _has_secret(opts)) and os.path.exists(FABRICS_DEV)


def _connect(opts, method):
    if _via_fabrics(opts, method):
        return _connect_fabrics(opts)
    if _has_secret(opts):
        return {"error": "DH-HMAC-CHAP needs %s (nvme-cli would expose the secret)"
                % FABRICS_DEV, "errno": errnolib.ENOENT, "already": False}
    return _connect_cli(opts)


def fabrics_option_string(opts):
    """The kernel's option string for /dev/nvme-fabrics (validated values only)."""
    parts = ["nqn=%s" % opts["nqn"], "transport=%s" % opts["transport"],
             "traddr=%s" % opts["traddr"], "trsvcid=%s" % opts["trsvcid"]]
    names = (("host_nqn", "hostnqn"), ("host_id", "hostid"), ("nr_io_queues", "nr_io_queues"),
             ("ctrl_loss_tmo", "ctrl_loss_tmo"), ("reconnect_delay", "reconnect_delay"),
             ("fast_io_fail_tmo", "fast_io_fail_tmo"), ("keep_alive_tmo", "keep_alive_tmo"),
             ("dhchap_secret", "dhchap_secret"), ("dhchap_ctrl_secret", "dhchap_ctrl_secret"))
    for key, kname in names:
        if opts.get(key) is not None:
            parts.append("%s=%s" % (kname, opts[key]))
    for part in parts:      # the last check before the kernel parses it: one option each
        value = part.split("=", 1)[1]
        bad = connection.unsafe_char(value.replace("=", "") if part.startswith("dhchap")
                                     else value, argv=False)
        if bad or not value:
            raise PrivilegedArgumentError("option %s refused: %s" % (
                part.split("=", 1)[0], bad or "empty"))     # never echo a value: a secret
    return ",".join(parts)


def _connect_fabrics(opts):
    try:
        fd = os.open(FABRICS_DEV, os.O_RDWR)
    except OSError as e:
        return {"error": "open %s: %s" % (FABRICS_DEV, e.strerror), "errno": e.errno,
                "already": False}
    try:
        os.write(fd, fabrics_option_string(opts).encode())
        reply = os.read(fd, 4096).decode(errors="replace")
    except OSError as e:
        return {"error": os.strerror(e.errno), "errno": e.errno,
                "already": e.errno == errnolib.EALREADY}
    finally:
        os.close(fd)
    m = re.search(r"instance=(\d+)", reply)
    if not m:
        return {"error": "unexpected reply %r" % reply, "errno": None, "already": False}
    return {"controller": "nvme%s" % m.group(1)}


def nvme_cli_argv(opts):
    argv = ["nvme", "connect", "-t", opts["transport"], "-a", opts["traddr"],
            "-s", opts["trsvcid"], "-n", opts["nqn"], "-o", "json"]
    flags = (("host_nqn", "-q"), ("host_id", "-I"), ("ctrl_loss_tmo", "-l"),
             ("reconnect_delay", "-c"), ("keep_alive_tmo", "-k"), ("nr_io_queues", "-i"))
    for key, flag in flags:
        if opts.get(key) is not None:
            argv += [flag, str(opts[key])]
    return argv


def _connect_cli(opts):
    argv = nvme_cli_argv(opts)
    proc = tools.run(argv, timeout=CLI_TIMEOUT)
    if proc.missing:
        return {"error": "nvme-cli is not installed", "errno": errnolib.ENOENT, "already": False}
    if proc.timed_out:
        return {"error": tools.describe_timeout(argv, proc, CLI_TIMEOUT),
                "errno": errnolib.ETIMEDOUT, "already": False}
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        already = proc.returncode in _ALREADY_EXITS or any(t in text.lower()
                                                           for t in _ALREADY_TEXTS)
        return {"error": text or "nvme connect exit %d" % proc.returncode,
                "errno": proc.returncode, "already": already}
    ctrl = None
    try:
        ctrl = json.loads(proc.stdout).get("device")
    except ValueError:
        m = re.search(r"\b(%s)\b" % names.CONTROLLER, text)
        ctrl = m.group(1) if m else None
    if ctrl and opts.get("fast_io_fail_tmo") is not None:
        # nvme-cli 2.3 has no option for it; the kernel takes it through sysfs
        _write_attr(ctrl, "fast_io_fail_tmo", opts["fast_io_fail_tmo"])
    return {"controller": ctrl}


@privileged.default.entrypoint
def delete_controller(name):
    """Disconnect one controller (what ``nvme disconnect -d`` does, without a process)."""
    return delete(name)


def delete(name):
    return _write_sysfs(fabrics_controller(name), "delete_controller", "1")


def subsystem_controller(name, nqn, host_nqn):
    """``name`` if it is a fabrics controller of subsystem ``nqn`` for ``host_nqn``."""
    name = fabrics_controller(name)
    for attr, wanted in (("subsysnqn", nqn), ("hostnqn", host_nqn)):
        try:
            with open(os.path.join(SYS_CLASS_NVME, name, attr)) as f:
                seen = f.read().strip()
        except OSError:
            seen = None
        if seen != wanted:
            raise PrivilegedArgumentError("%s is not a controller of %s for %s" % (
                name, nqn, host_nqn))
    return name


@privileged.default.entrypoint
def rescan_controllers(names):
    """Ask live controllers to rescan their namespaces (one call for all of them)."""
    return {name: _write_sysfs(fabrics_controller(name), "rescan_controller", "1")
            for name in names}


@privileged.default.entrypoint
def set_controller_attrs(name, attrs):
    """Write timeout attributes of a connected controller (only TUNABLE_ATTRS)."""
    name = fabrics_controller(name)
    out = {}
    for attr, value in dict(attrs).items():
        out[attr] = _write_attr(name, attr, value)
    return out


def _write_attr(name, attr, value):
    name = fabrics_controller(name)
    if attr not in TUNABLE_ATTRS:
        raise PrivilegedArgumentError("attribute %r is not tunable" % (attr,))
    if value == "off" or value == -1:
        value = "off" if attr == "fast_io_fail_tmo" else "-1"
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 86400:
        raise PrivilegedArgumentError("%s must be an integer in 0..86400 or 'off'" % attr)
    return _write_sysfs(name, attr, str(value))


def _write_sysfs(name, attr, value):
    path = os.path.join(SYS_CLASS_NVME, name, attr)
    try:
        with open(path, "w") as f:
            f.write(value)
        return None
    except OSError as e:
        return "%s: %s" % (path, e.strerror)


# -- Identify Namespace: the size the target reports now (extend_volume) ----------------------

_NS_DEVICE_RE = re.compile("^/dev/%s$" % names.NAMESPACE)
NVME_IOCTL_ID = 0x4E40                 # _IO('N', 0x40): the namespace ID of a block device
NVME_IOCTL_ADMIN_CMD = 0xC0484E41      # _IOWR('N', 0x41, struct nvme_passthru_cmd), 72 bytes
_PASSTHRU = struct.Struct("<BBHIIIQQII6III")
_IDENTIFY = 0x06                       # admin opcode; CNS 0 (cdw10) = Identify Namespace
_IDENTIFY_LEN = 4096
IDENTIFY_TIMEOUT_MS = 5000             # a target that does not answer costs at most this


def namespace_device(path):
    if not isinstance(path, str) or not _NS_DEVICE_RE.fullmatch(path):
        raise PrivilegedArgumentError("not an NVMe namespace device: %r" % (path,))
    return path


def identify_command(nsid, addr, length):
    """struct nvme_passthru_cmd for Identify Namespace (CNS 0) of ``nsid``."""
    return bytearray(_PASSTHRU.pack(_IDENTIFY, 0, 0, nsid, 0, 0, 0, addr, 0, length,
                                    0, 0, 0, 0, 0, 0, IDENTIFY_TIMEOUT_MS, 0))


def identify_size(data):
    """Bytes of a namespace from its Identify data: NSZE (logical blocks) times the block
    size of the LBA format in use (FLBAS, LBADS); None when that size is not sane."""
    nsze = int.from_bytes(data[0:8], "little")
    nlbaf, flbas = data[25], data[26]
    index = flbas & 0x0F
    if nlbaf >= 16:
        index |= ((flbas >> 5) & 0x03) << 4
    if index > nlbaf:
        return None
    lbads = data[128 + 4 * index + 2]
    if not 9 <= lbads <= 24 or not nsze:
        return None
    return nsze << lbads


@privileged.default.entrypoint
def identify_namespace_size(path):
    """The size in bytes the target reports for the namespace behind ``path`` now.

    -> {'size': int or None, 'error': text or None}.  One Identify Namespace admin command
    through the block device (the kernel sends it on a live path), without rescanning.
    """
    path = namespace_device(path)
    buf = ctypes.create_string_buffer(_IDENTIFY_LEN)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return {"size": None, "error": "open %s: %s" % (path, e.strerror)}
    try:
        nsid = fcntl.ioctl(fd, NVME_IOCTL_ID)
        cmd = identify_command(nsid, ctypes.addressof(buf), _IDENTIFY_LEN)
        status = fcntl.ioctl(fd, NVME_IOCTL_ADMIN_CMD, cmd, True)
    except OSError as e:
        return {"size": None, "error": "identify %s: %s" % (path, e.strerror)}
    finally:
        os.close(fd)
    if status:
        return {"size": None, "error": "identify %s: NVMe status %#x" % (path, status)}
    size = identify_size(buf.raw)
    return {"size": size, "error": None if size else "identify %s: no usable size" % path}

"""Privileged dm-multipath (dmsetup) entrypoints: only maps whose DM uuid carries our prefix.

Tables are built here from validated parts (never passed in as text); paths are NVMe-oF
namespaces only.  Whether a map is created or reloaded is the caller's decision
(``nvmeof_mp.devmapper.load_step``).  Results are ``{'ok': bool, 'out': str, 'error': str}``.
"""

from __future__ import annotations

import re

from nvmeof_mp import names, privileged
from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import host
from nvmeof_mp.privileged.storage import _refused, _run

_DM_NAME_RE = re.compile("^%s$" % names.DM_NAME)
_DEVNUM_RE = re.compile(r"^\d{1,4}:\d{1,7}$")
DM_UUID_PREFIX = "nvmeof_mp-"       # not "mpath-": multipathd leaves the map alone
DM_MESSAGES = ("reinstate_path", "fail_path", "fail_if_no_path", "queue_if_no_path")


def dm_name(value):
    if not isinstance(value, str) or not _DM_NAME_RE.fullmatch(value):
        raise PrivilegedArgumentError("not a safe dm name: %r" % (value,))
    return value


def devnum(value):
    if not isinstance(value, str) or not _DEVNUM_RE.fullmatch(value):
        raise PrivilegedArgumentError("not a major:minor: %r" % (value,))
    return value


def multipath_table(size_sectors, devnums):
    """One priority group, round-robin over every replica; queue while no path is left.

    ``queue_mode bio``: a native NVMe multipath head is a bio-based device, and the kernel
    rejects it under a request-based map ("including non-request-stackable devices"); bio
    mode stacks on both kinds (multipathd uses it for NVMe too).  Repeat count 1: larger
    values are deprecated.
    """
    paths = " ".join("%s 1" % devnum(d) for d in devnums)
    return ("0 %d multipath 3 queue_if_no_path queue_mode bio 0 1 1 round-robin 0 %d 1 %s"
            % (size_sectors, len(devnums), paths))


def our_map(name):
    """``name`` when a map of that name exists and carries our DM uuid prefix, None when there
    is no such map; a map of anyone else (LVM, dm-crypt, multipathd's) is refused.  Checked
    on every dm call: the name alone proves nothing."""
    name = dm_name(name)
    info = _run(["dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name])
    if not info["ok"]:
        return None
    uuid = info["out"].strip()
    if not uuid.startswith(DM_UUID_PREFIX):
        raise PrivilegedArgumentError("map %s is not one of nvmeof_mp's (DM uuid %r)"
                                      % (name, uuid))
    return name


_NO_MAP = {"ok": False, "out": "", "error": "no such map"}


def _map_table(name, size_sectors, devnums):
    name = dm_name(name)
    if not isinstance(size_sectors, int) or size_sectors <= 0 or not devnums:
        raise PrivilegedArgumentError("bad map geometry")
    # paths are NVMe-oF namespaces only: never a local disk, an LVM volume or another map
    return name, multipath_table(size_sectors, [host.fabrics_devnum(d) for d in devnums])


@privileged.default.entrypoint
def dm_create(name, size_sectors, devnums):
    return create_map(name, size_sectors, devnums)


@privileged.default.entrypoint
def dm_reload(name, size_sectors, devnums):
    return reload_map(name, size_sectors, devnums)


def create_map(name, size_sectors, devnums):
    """Create the multipath map with our DM uuid; refused when a map of that name exists
    (ours: the caller reloads it; anyone else's: never touched)."""
    name, table = _map_table(name, size_sectors, devnums)
    if our_map(name):
        return _refused("map %s exists already" % name)
    result = _run(["dmsetup", "create", name, "--uuid", DM_UUID_PREFIX + name,
                   "--table", table])
    if not result["ok"]:
        made = _run(["dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name])
        if made["ok"] and made["out"].strip() == DM_UUID_PREFIX + name:
            _run(["dmsetup", "remove", name])       # leave no empty map of ours behind
    return _loaded(name, result)


def reload_map(name, size_sectors, devnums):
    """Reload a map of ours with the current set of replica devices."""
    name, table = _map_table(name, size_sectors, devnums)
    if not our_map(name):
        return dict(_NO_MAP)
    result = _run(["dmsetup", "reload", name, "--table", table])
    if result["ok"]:
        result = _run(["dmsetup", "resume", name])
    return _loaded(name, result)


def _loaded(name, result):
    if result["ok"]:
        _run(["dmsetup", "mknodes", name])          # no udev: make /dev/mapper/<name>
    elif "multipath" in result["error"] and "target" in result["error"].lower():
        result["error"] += " (is the dm_multipath kernel module available?)"
    return result


@privileged.default.entrypoint
def dm_message(name, message, devnum_=None):
    return message_map(name, message, devnum_)


def message_map(name, message, devnum_=None):
    if message not in DM_MESSAGES:
        raise PrivilegedArgumentError("dm message %r not allowed" % (message,))
    argv = ["dmsetup", "message", dm_name(name), "0", message]
    if message in ("reinstate_path", "fail_path"):
        argv.append(devnum(devnum_))
    if not our_map(name):
        return dict(_NO_MAP)
    return _run(argv)


@privileged.default.entrypoint
def dm_status(name):
    return map_status(name)


def map_status(name):
    """Path states of a map of ours: {'259:0': 'A' | 'F'}; None when the map does not exist."""
    if not our_map(name):
        return None
    result = _run(["dmsetup", "status", name])
    if not result["ok"]:
        return None
    return parse_multipath_status(result["out"])


def parse_multipath_status(text):
    tokens = text.split()
    return {tokens[i]: tokens[i + 1] for i in range(len(tokens) - 1)
            if _DEVNUM_RE.fullmatch(tokens[i]) and tokens[i + 1] in ("A", "F")}


@privileged.default.entrypoint
def dm_remove(name):
    return remove_map(name)


def remove_map(name):
    """Stop queueing (so nothing hangs), then remove a map of ours."""
    if not our_map(name):
        return dict(_NO_MAP)
    _run(["dmsetup", "message", name, "0", "fail_if_no_path"])
    return _run(["dmsetup", "remove", "--retry", name])

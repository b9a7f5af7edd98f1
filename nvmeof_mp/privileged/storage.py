"""Privileged md (mdadm) and dm-multipath (dmsetup) entrypoints.

Arguments are structured and validated: an md alias is a safe name, devices are our own kinds
of block devices, dm tables are built here from validated parts (never passed in as text).
Results are ``{'ok': bool, 'out': str, 'error': str}``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from nvmeof_mp import privileged
from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged.host import device_path

_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_DM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_DEVNUM_RE = re.compile(r"^\d{1,4}:\d{1,7}$")
DM_UUID_PREFIX = "nvmeof_mp-"       # not "mpath-": multipathd leaves the map alone
DM_MESSAGES = ("reinstate_path", "fail_path", "fail_if_no_path", "queue_if_no_path")


def alias(value):
    if not isinstance(value, str) or not _ALIAS_RE.match(value):
        raise PrivilegedArgumentError("not a safe md alias: %r" % (value,))
    return value


def dm_name(value):
    if not isinstance(value, str) or not _DM_NAME_RE.match(value):
        raise PrivilegedArgumentError("not a safe dm name: %r" % (value,))
    return value


def devnum(value):
    if not isinstance(value, str) or not _DEVNUM_RE.match(value):
        raise PrivilegedArgumentError("not a major:minor: %r" % (value,))
    return value


def nvme_devices(devices):
    out = [device_path(d) for d in devices]
    if not out or not all(d.startswith("/dev/nvme") for d in out):
        raise PrivilegedArgumentError("md legs must be /dev/nvme* namespaces")
    return out


def _run(argv, timeout=120):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"ok": False, "out": "", "error": "%s is not installed" % argv[0]}
    except subprocess.TimeoutExpired:
        return {"ok": False, "out": "", "error": "%s timed out" % " ".join(argv[:2])}
    return {"ok": p.returncode == 0, "out": p.stdout,
            "error": "" if p.returncode == 0 else (p.stderr or p.stdout).strip()}


def mdadm_create_argv(name, devices, raid_devices):
    legs = list(devices) + ["missing"] * (raid_devices - len(devices))
    argv = ["mdadm", "--create", "/dev/md/" + name, "--run", "--name=" + name,
            "--level=raid1", "--raid-devices=%d" % raid_devices, "--metadata=1.2",
            "--bitmap=internal", "--homehost=any", "--failfast", "--assume-clean"]
    if raid_devices == 1:
        argv.append("--force")          # mdadm refuses a one-disk RAID1 without it
    return argv + legs


@privileged.default.entrypoint
def md_create(name, devices, raid_devices):
    name, devices = alias(name), nvme_devices(devices)
    if not isinstance(raid_devices, int) or not len(devices) <= raid_devices <= 32:
        raise PrivilegedArgumentError("raid_devices out of range")
    return _run(mdadm_create_argv(name, devices, raid_devices))


def _holder_md(device):
    """The md array (``/dev/mdN``) that holds a leg, if any (udev's incremental assembly)."""
    holders = "/sys/class/block/%s/holders" % os.path.basename(device)
    try:
        return next(("/dev/" + h for h in os.listdir(holders) if h.startswith("md")), None)
    except OSError:
        return None


def _add_leg(md, dev):
    """Re-add a returning leg (bitmap resync), or add it when re-add is refused."""
    result = _run(["mdadm", "--manage", md, "--re-add", dev])
    if not result["ok"]:
        result = _run(["mdadm", "--manage", md, "--add", dev])
    return result


def _find_array(md, devices):
    """The array for /dev/md/<name>: its link, mdadm's map (the link may not exist yet while
    udev works), or the md device holding one of the legs."""
    if os.path.exists(md):
        return md
    try:
        with open("/run/mdadm/map") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[3] == md:
                    return "/dev/" + fields[0]
    except OSError:
        pass
    return next((h for h in map(_holder_md, devices) if h), None)


def _array_state(array):
    try:
        name = os.path.basename(os.path.realpath(array))
        with open("/sys/block/%s/md/array_state" % name) as f:
            return f.read().strip()
    except OSError:
        return None


@privileged.default.entrypoint
def md_assemble(name, devices):
    """Bring up /dev/md/<name> from legs that carry its superblock, and (re-)add every leg.

    The array may exist already: running (a heal re-adds legs), or half-assembled and
    inactive because udev's ``mdadm --incremental`` grabbed legs as they appeared (our
    assemble would fail with "busy").  An inactive one is stopped and assembled again from
    all legs at once (no needless resync); a running one gets its missing legs re-added.
    """
    md, devices = "/dev/md/" + alias(name), nvme_devices(devices)
    result = {"ok": False, "out": "", "error": "no array"}
    for attempt in range(6):
        array = _find_array(md, devices)
        if array and _array_state(array) == "inactive":
            _run(["mdadm", "--stop", array])
            continue
        if array:
            break
        marked = [d for d in devices if _examine(d)]
        result = _run(["mdadm", "--assemble", "--run", md] + marked)
        if result["ok"]:
            array = md
            break
        time.sleep(0.1 * (attempt + 1))     # udev's incremental assembly is racing us
    else:
        return result
    _run(["mdadm", "--manage", array, "--remove", "failed"])
    held = {d for d in devices if _holder_md(d)}
    errors = [r["error"] for r in (_add_leg(array, d) for d in devices if d not in held)
              if not r["ok"]]
    active = _array_state(array) not in (None, "inactive")
    return {"ok": active, "out": "", "error": "" if active else "; ".join(errors) or
            "array %s is not active" % array}


@privileged.default.entrypoint
def md_stop(name):
    return stop_array(alias(name))


def stop_array(name, dev="/dev"):
    """Stop /dev/md/<name>; then remove the alias link if it dangles.

    udev removes the link when the array goes; without udev (containers, minimal hosts) it
    would stay behind pointing at nothing.  Only a symlink whose target is gone is removed.
    """
    result = _run(["mdadm", "--stop", "/dev/md/" + alias(name)])
    if result["ok"]:
        link = os.path.join(dev, "md", name)
        try:
            if os.path.islink(link) and not os.path.exists(link):
                os.unlink(link)
        except OSError:
            pass            # udev got there first
    return result


@privileged.default.entrypoint
def md_grow(name):
    return _run(["mdadm", "--grow", "/dev/md/" + alias(name), "--size", "max"])


def _examine(device):
    result = _run(["mdadm", "--examine", "--export", device])
    if not result["ok"]:
        return None
    return dict(line.split("=", 1) for line in result["out"].splitlines() if "=" in line)


@privileged.default.entrypoint
def md_examine(device):
    """``mdadm --examine --export``: does a leg carry an md superblock, and of which array."""
    return _examine(nvme_devices([device])[0])


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


@privileged.default.entrypoint
def dm_load(name, size_sectors, devnums):
    return load_map(name, size_sectors, devnums)


def load_map(name, size_sectors, devnums):
    """Create the multipath map, or reload a map of ours with the current set of replica
    devices."""
    name = dm_name(name)
    if not isinstance(size_sectors, int) or size_sectors <= 0 or not devnums:
        raise PrivilegedArgumentError("bad map geometry")
    table = multipath_table(size_sectors, devnums)
    if our_map(name):
        result = _run(["dmsetup", "reload", name, "--table", table])
        if result["ok"]:
            result = _run(["dmsetup", "resume", name])
    else:
        result = _run(["dmsetup", "create", name, "--uuid", DM_UUID_PREFIX + name,
                       "--table", table])
        if not result["ok"] and _run(["dmsetup", "info", name])["ok"]:
            _run(["dmsetup", "remove", name])       # leave no empty map behind
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
            if _DEVNUM_RE.match(tokens[i]) and tokens[i + 1] in ("A", "F")}


@privileged.default.entrypoint
def dm_remove(name):
    return remove_map(name)


def remove_map(name):
    """Stop queueing (so nothing hangs), then remove a map of ours."""
    if not our_map(name):
        return dict(_NO_MAP)
    _run(["dmsetup", "message", name, "0", "fail_if_no_path"])
    return _run(["dmsetup", "remove", "--retry", name])

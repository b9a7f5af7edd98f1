"""Is a block device in use on this host?  (No root: reads of sysfs and /proc only.)

A namespace is in use when something on this host would break if it went away: a device
stacked on it or on one of its partitions (md, device-mapper, LVM, bcache: the kernel lists
them under ``holders/``), a filesystem mounted from it or from a partition, or swap on it.
What the reads cannot see - a process that keeps the device open exclusively, a filesystem
mounted only in another mount namespace (mountinfo is this process's view) - the daemon's
``exclusive_busy`` finds by trying an exclusive open: the kernel refuses it for every use
named here too.
"""

from __future__ import annotations

import os
import re

from nvmeof_mp.topology import listdir, read_attr

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")


def in_use(root: str, names) -> dict[str, str]:
    """{name: reason} for the block devices of ``names`` (``nvme0n1``, as
    ``topology.Namespace.name``) that are in use on the host whose tree is under ``root``
    (``"/"`` on a real host); devices not in use are left out.

    A reason is short and human, its parts joined with ``"; "``: ``held by dm-3``,
    ``held by dm-3, md127``, ``mounted at /mnt/x`` (``(+N more)`` when mounted elsewhere too),
    ``used as swap``, each prefixed with ``partition nvme0n1p2`` when it concerns a
    partition.  A file that is missing or unreadable (no such device, no /proc) counts as
    no use.  /proc/self/mountinfo and /proc/swaps are read once per call, whatever the
    number of devices.  Raises ``ValueError`` for a name that is not a block device name.
    """
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError("not a block device name: %r" % (name,))
    if not names:
        return {}
    mounts = _mounts(root)
    swaps = _swaps(root)
    found = {}
    for name in names:
        reasons = _uses(root, name, mounts, swaps)
        for part in _partitions(root, name):
            reasons += ["partition %s %s" % (part, r) for r in _uses(root, part, mounts, swaps)]
        if reasons:
            found[name] = "; ".join(reasons)
    return found


def _block(root, name, *parts):
    return os.path.join(root, "sys/class/block", name, *parts)


def _partitions(root, name):
    """Partitions of a disk: its subdirectories ``<name>p<N>`` (``<name><N>``) that have a
    ``partition`` attribute."""
    return sorted((e for e in listdir(_block(root, name)) if e.startswith(name) and e != name
                   and os.path.exists(_block(root, name, e, "partition"))), key=_natural)


def _uses(root, name, mounts, swaps):
    reasons = []
    holders = sorted(listdir(_block(root, name, "holders")), key=_natural)
    if holders:
        reasons.append("held by " + ", ".join(holders))
    devnum = read_attr(_block(root, name, "dev"))
    points = mounts.get("/dev/" + name, []) + (mounts.get(devnum, []) if devnum else [])
    points = list(dict.fromkeys(points))
    if points:
        more = " (+%d more)" % (len(points) - 1) if len(points) > 1 else ""
        reasons.append("mounted at %s%s" % (points[0], more))
    if name in swaps:
        reasons.append("used as swap")
    return reasons


def _mounts(root):
    """{major:minor or /dev/<source>: [mount points]} from one read of mountinfo.

    Field 3 is the device number; filesystems with an anonymous one (btrfs: 0:NN) are found
    by their source, the first field after the `` - `` separator's type.
    """
    mounts = {}
    for line in (read_attr(os.path.join(root, "proc/self/mountinfo")) or "").splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        mounts.setdefault(fields[2], []).append(point)
        tail = line.split(" - ", 1)[1].split() if " - " in line else []
        if fields[2].startswith("0:") and len(tail) > 1 and tail[1].startswith("/dev/"):
            mounts.setdefault(_unescape(tail[1]), []).append(point)
    return mounts


def _swaps(root):
    """Names of the block devices swap is on (``/proc/swaps``, its header line skipped)."""
    lines = (read_attr(os.path.join(root, "proc/swaps")) or "").splitlines()[1:]
    return {os.path.basename(_unescape(line.split()[0])) for line in lines if line.split()}


def _unescape(field):
    """The kernel writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

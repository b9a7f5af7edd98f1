"""Is a new namespace claimed by a device-mapper map that is not ours (multipathd's)?

With ``nvme_core.multipath=N``, multipathd configured to take every disk (``find_multipaths
greedy``, or the namespace's WWID listed) builds a map of its own over a namespace this library
just connected: udev's multipath rule marks the device ``DM_MULTIPATH_DEVICE_PATH=1`` when it
processes it, then multipathd stacks ``mpathX`` on it (``holders/dm-N``).  Handed out, the
device would be written beside that map; as a RAID1 or dm leg, mdadm or dmsetup finds it busy.
The fix is on the host: the multipath drop-in ``etc/multipath/conf.d/nvmeof-mp.conf`` that
blacklists NVMe-oF devices.  No root: reads of sysfs and udev's database only.
"""

from __future__ import annotations

import os

from oslo_log import log as logging

from nvmeof_mp.topology import listdir, read_attr, udev_done
from nvmeof_mp.waiting import poll

LOG = logging.getLogger(__name__)

#: the dm uuid prefix of this library's maps (as nvmeof_mp.privileged.dmsetup.DM_UUID_PREFIX)
OUR_DM_UUID_PREFIX = "nvmeof_mp-"
#: what multipath-tools' udev rule records for a device multipathd takes as a path
MPATH_MARK = "E:DM_MULTIPATH_DEVICE_PATH=1"
#: where the drop-in goes on the host (multipath-tools' default ``config_dir``)
DROPIN = "/etc/multipath/conf.d/nvmeof-mp.conf"
#: how long a device udev marked as a multipath path is watched for multipathd's map, so the
#: error can name it (it fails either way)
MAP_WAIT = 5.0


def foreign_maps(root: str, name: str) -> list[str]:
    """The device-mapper maps holding block device ``name`` that are not ours, as
    ``"mpatha (dm-3, uuid mpath-...)"``.  A holder whose dm attributes cannot be read
    counts as foreign; md arrays (ours, or not) are not device-mapper maps."""
    found = []
    for holder in sorted(listdir(os.path.join(root, "sys/class/block", name, "holders"))):
        if not holder.startswith("dm-"):
            continue
        dm = os.path.join(root, "sys/class/block", holder, "dm")
        uuid = read_attr(os.path.join(dm, "uuid")) or ""
        if uuid.startswith(OUR_DM_UUID_PREFIX):
            continue
        found.append("%s (%s, uuid %s)" % (read_attr(os.path.join(dm, "name")) or "?", holder,
                                           uuid or "?"))
    return found


def multipath_marked(root: str, name: str) -> bool:
    """Has udev's multipath rule marked block device ``name`` a multipath path?"""
    dev = read_attr(os.path.join(root, "sys/class/block", name, "dev"))
    if not dev:
        return False
    data = read_attr(os.path.join(root, "run/udev/data", "b" + dev)) or ""
    return MPATH_MARK in data.splitlines()


def check(root: str, name: str, clock, udev_wait: float = 0.0) -> str | None:
    """Why namespace ``name`` must not be used (a foreign map holds it, or udev marked it for
    multipathd, whose map is then awaited up to MAP_WAIT to be named), or None.

    With ``udev_wait`` and udev running, udev's verdict is awaited that long first: its
    multipath rule's mark is in its database, which udev writes after it gave the node its
    group and mode (a service user can open the node before the mark is readable, root at
    once).  Native multipath heads need no wait: multipath-tools leaves them alone.
    """
    if udev_wait and not poll(lambda: udev_done(root, name), udev_wait, clock):
        LOG.warning("udev has not processed %s after %ss: whether multipathd takes it is "
                    "unknown", name, udev_wait)
    maps = foreign_maps(root, name)
    if not maps and multipath_marked(root, name):
        maps = poll(lambda: foreign_maps(root, name), MAP_WAIT, clock) or []
        if not maps:
            return ("udev marks it a multipath path (DM_MULTIPATH_DEVICE_PATH=1): multipathd "
                    "takes it; " + _FIX)
    if maps:
        return "held by device-mapper map %s; %s" % (", ".join(maps), _FIX)
    return None


_FIX = ("multipathd must leave NVMe-oF devices alone: install the drop-in "
        "etc/multipath/conf.d/nvmeof-mp.conf of nvmeof_mp as %s and run "
        "'multipathd reconfigure' (or use nvme_core.multipath=Y)" % DROPIN)

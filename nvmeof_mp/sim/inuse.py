"""A namespace in use on the simulated host: holders, partitions, mounts, swap, and processes
holding a device open exclusively.

A mixin of ``SimHost``.  The helpers change the tree the way the kernel shows each use
(``holders/<name>`` links, ``<disk>p<N>`` partition directories, lines of
``proc/self/mountinfo`` and ``proc/swaps``) and remember the claim, so the fake kernel's
exclusive open fails with EBUSY as Linux's does: on a device that is claimed, or whose
partition is (a claimed partition marks its whole disk claimed too).
"""

import os

from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.sim.files import unlink as _unlink, write as _write
from nvmeof_mp.sim.sysfs import UDEV_DB_LAG

# as the daemon's (nvmeof_mp.privileged.host; the tests check they agree)
BUSY = "open exclusively or held by another user"
EXCLUSIVE_TIMEOUT = 5.0
MPATH_MARK = "E:DM_MULTIPATH_DEVICE_PATH=1\n"     # what multipath-tools' udev rule records


class SimInUse:
    def _inuse(self):
        state = self.__dict__.get("_inuse_state")
        if state is None:
            state = self.__dict__["_inuse_state"] = {"open": set(), "claims": {}, "parts": {},
                                                     "hang": set()}
        return state

    def _claim(self, name, what, on=True):
        claims = self._inuse()["claims"].setdefault(name, set())
        (claims.add if on else claims.discard)(what)

    def _block_dir(self, name):
        return os.path.realpath(os.path.join(self.sys, "class/block", name))

    # -- what tests do to the host ----------------------------------------------------------

    def hold_open(self, device):
        """A process opens ``/dev/<name>`` with O_EXCL and keeps it open."""
        self._inuse()["open"].add(os.path.basename(device))

    def hang_open(self, device):
        """An open of ``/dev/<name>`` does not return (its I/O queues: no path serves it)."""
        self._inuse()["hang"].add(os.path.basename(device))

    def release(self, device):
        """Undo ``hold_open`` and ``hang_open``."""
        self._inuse()["open"].discard(os.path.basename(device))
        self._inuse()["hang"].discard(os.path.basename(device))

    def add_holder(self, name, holder):
        """``holder`` (``dm-3``, ``md127``) is stacked on block device ``name``."""
        holders = os.path.join(self._block_dir(name), "holders")
        os.makedirs(holders, exist_ok=True)
        os.symlink("../../" + holder, os.path.join(holders, holder))
        self._claim(name, ("holder", holder))

    def remove_holder(self, name, holder):
        _unlink(os.path.join(self._block_dir(name), "holders", holder))
        self._claim(name, ("holder", holder), on=False)

    def add_partition(self, name, number):
        """Partition ``number`` of disk ``name`` appears (``nvme0n1p1``); returns its name."""
        part = "%sp%d" % (name, number)
        d = os.path.join(self._block_dir(name), part)
        link = os.path.relpath(d, os.path.join(self.sys, "class/block"))
        self._make_block(d, part, {"partition": str(number), "size": "2048"}, link)
        self._inuse()["parts"][part] = name
        return part

    def mount(self, name, mountpoint):
        """Mount the filesystem on block device ``name`` at ``mountpoint``."""
        with open(os.path.join(self._block_dir(name), "dev")) as f:
            devnum = f.read().strip()
        path = os.path.join(self.root, "proc/self/mountinfo")
        lines = _lines(path)
        lines.append("%d 1 %s / %s rw,relatime shared:1 - ext4 /dev/%s rw" % (
            100 + len(lines), devnum, _escape(mountpoint), name))
        _write(path, "\n".join(lines))
        self._claim(name, ("mount", mountpoint))

    def unmount(self, mountpoint):
        path = os.path.join(self.root, "proc/self/mountinfo")
        lines = _lines(path)
        mine = [i for i, line in enumerate(lines) if line.split()[4] == _escape(mountpoint)]
        if mine:
            name = os.path.basename(lines.pop(mine[-1]).split(" - ", 1)[1].split()[1])
            _write(path, "\n".join(lines))
            if len(mine) == 1:
                self._claim(name, ("mount", mountpoint), on=False)

    def swapon(self, name):
        path = os.path.join(self.root, "proc/swaps")
        lines = _lines(path) or ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
        lines.append("/dev/%s\t\t\t\tpartition\t2096124\t\t0\t\t-2" % name)
        _write(path, "\n".join(lines))
        self._claim(name, ("swap",))

    # -- the fake kernel ---------------------------------------------------------------------

    def exclusive_busy(self, devices):
        """As the daemon's: {device: reason} for the devices an O_EXCL open fails on; a
        device that is not a connected namespace (``/dev/nvmeXnY``) refuses the call."""
        self._count("exclusive_busy")
        for device in devices:
            if not device.startswith("/dev/") or self._identity_of(device) is None:
                raise PrivilegedArgumentError("not an NVMe-oF namespace: %r" % (device,))
        state = self._inuse()
        busy = {}
        if any(os.path.basename(d) in state["hang"] for d in devices):
            self.clock.sleep(EXCLUSIVE_TIMEOUT)       # the daemon waits this long, then answers
        for device in devices:
            name = os.path.basename(device)
            if name in state["hang"]:
                busy[device] = "open did not return within %gs" % EXCLUSIVE_TIMEOUT
                continue
            parts = [p for p, disk in state["parts"].items() if disk == name]
            if name in state["open"] or any(state["claims"].get(n) for n in [name] + parts):
                busy[device] = BUSY
        return busy


def _lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _escape(path):
    """As the kernel shows a path in /proc: space, tab, newline and backslash in octal."""
    return "".join("\\%03o" % ord(c) if c in " \t\n\\" else c for c in path)


class SimMultipathd:
    """A multipathd with ``find_multipaths greedy`` and no blacklist for NVMe-oF devices on a
    host with ``nvme_core.multipath=N`` (doc/source/faults.rst), a mixin of ``SimHost``.

    Once on, every new namespace block device is claimed as multipath-tools does: when udev
    processes it, its rule (``multipath -u``) marks it ``DM_MULTIPATH_DEVICE_PATH=1``; ``delay``
    seconds later multipathd has a map ``mpath<letter>`` (dm uuid ``mpath-<wwid>``) stacked on
    it (``holders/dm-N``).  Without udev only the map appears.  With native multipath on,
    multipath-tools leaves NVMe devices alone, and so does this one.
    """

    def multipathd_greedy(self, delay=0.5):
        self.__dict__["_mpathd_delay"] = delay

    def _claims(self):
        return self.__dict__.get("_mpathd_delay") is not None and not self.native

    def _udev_rules_say(self, name):
        """What udev's rules add to a new block device's database entry: multipath-tools'
        mark when this multipathd takes it."""
        return MPATH_MARK if self._claims() else ""

    def _new_block_device(self, name, devnum):
        if self._claims():
            self.clock.at(self.__dict__["_mpathd_delay"] + (
                self.udev_delay + UDEV_DB_LAG if self.udev_delay is not None else 0.0),
                lambda: self._mpath_map(name))

    def _mpath_map(self, name):
        try:
            with open(os.path.join(self._block_dir(name), "wwid")) as f:
                wwid = f.read().strip()
        except OSError:
            return                  # gone already
        maps = self.__dict__.setdefault("_mpath_maps", [])
        dm = "dm-%d" % (90 + len(maps))
        maps.append(dm)
        d = os.path.join(self.sys, "devices/virtual/block", dm)
        _write(os.path.join(d, "dm/name"), "mpath" + "abcdefghijklmnopqrstuvwxyz"[len(maps) - 1])
        _write(os.path.join(d, "dm/uuid"), "mpath-" + wwid)
        os.symlink(d, os.path.join(self.sys, "class/block", dm))
        self.add_holder(name, dm)

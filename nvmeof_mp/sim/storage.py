"""md RAID1 and dm-multipath of the simulated host, as mdadm and dmsetup behave.

A mixin of ``SimHost``: it uses the host's lock, call counter, tree and controllers.  An md
superblock lives on the target's data, so it is keyed by (NQN, nsid), not by /dev name, and
survives reconnects under other device names, as on a real host.
"""

import os
import shutil

from nvmeof_mp.sim.files import unlink as _unlink, write as _write


class SimStorage:
    def _ok(self, out=""):
        return {"ok": True, "out": out, "error": ""}

    def _fail(self, error):
        return {"ok": False, "out": "", "error": error}

    def _identity_of(self, device):
        name = os.path.basename(device)
        for c in self.ctrls.values():
            for nsid, dev in c.namespaces.items():
                if dev == name:
                    return (c.nqn, nsid)
        return None

    def _size_of(self, device):
        with open(os.path.join(self.sys, "class/block", os.path.basename(device), "size")) as f:
            return int(f.read())

    def md_create(self, name, devices, raid_devices):
        self._count("md_create")
        with self.lock:
            if name in self.md:
                return self._fail("mdadm: /dev/md/%s is already in use." % name)
            ids = [self._identity_of(d) for d in devices]
            if None in ids:
                return self._fail("mdadm: cannot open %s: No such file or directory"
                                  % devices[ids.index(None)])
            for i in ids:
                self.superblocks[i] = name
            self._md_start(name, devices, raid_devices)
            return self._ok("mdadm: array /dev/md/%s started." % name)

    def _md_start(self, name, devices, raid_devices):
        size = min(self._size_of(d) for d in devices) - 2048
        used = {m["minor"] for m in self.md.values()}
        minor = next(n for n in range(127, 0, -1) if n not in used)
        self.md[name] = {"legs": {d: "active" for d in devices}, "raid_devices": raid_devices,
                         "size": size, "minor": minor}
        _write(os.path.join(self.root, "dev/md%d" % minor), "")
        os.makedirs(os.path.join(self.root, "dev/md"), exist_ok=True)
        os.symlink("../md%d" % minor, os.path.join(self.root, "dev/md", name))
        _write(os.path.join(self.sys, "class/block/md%d/size" % minor), str(size))

    def md_assemble(self, name, devices):
        """Assemble from legs with this array's superblock, or adopt the running array;
        then (re-)add every leg, a failed member giving its slot back."""
        self._count("md_assemble")
        with self.lock:
            if name not in self.md:
                legs = [d for d in devices
                        if self.superblocks.get(self._identity_of(d)) == name]
                if not legs:
                    return self._fail("mdadm: no devices found for /dev/md/%s" % name)
                self._md_start(name, legs, 2)
            md = self.md[name]
            for device in devices:
                ident = self._identity_of(device)
                if ident is None:
                    continue
                for dev, state in list(md["legs"].items()):
                    if state == "faulty" and self._identity_of(dev) in (None, ident):
                        del md["legs"][dev]
                md["legs"][device] = "active"
                self.superblocks[ident] = name
            return self._ok("mdadm: /dev/md/%s has been started with %d drives." % (
                name, len(md["legs"])))

    def md_fail(self, name, device):
        """md marks a leg faulty after an I/O error (failfast)."""
        with self.lock:
            self.md[name]["legs"][device] = "faulty"

    def md_stop(self, name):
        self._count("md_stop")
        with self.lock:
            md = self.md.pop(name, None)
            if md is None:
                return self._fail("mdadm: error opening /dev/md/%s: No such file or directory"
                                  % name)
            _unlink(os.path.join(self.root, "dev/md", name))
            _unlink(os.path.join(self.root, "dev/md%d" % md["minor"]))
            shutil.rmtree(os.path.join(self.sys, "class/block/md%d" % md["minor"]),
                          ignore_errors=True)
            return self._ok("mdadm: stopped /dev/md/%s" % name)

    def md_grow(self, name):
        self._count("md_grow")
        with self.lock:
            md = self.md[name]
            md["size"] = min(self._size_of(d) for d, s in md["legs"].items()
                             if s == "active") - 2048
            _write(os.path.join(self.sys, "class/block/md%d/size" % md["minor"]), str(md["size"]))
            return self._ok()

    def md_examine(self, device):
        self._count("md_examine")
        name = self.superblocks.get(self._identity_of(device))
        return {"MD_LEVEL": "raid1", "MD_NAME": "any:" + name} if name else None

    def dm_load(self, name, size_sectors, devnums):
        self._count("dm_load")
        with self.lock:
            old = self.dm.get(name, {"paths": {}})["paths"]
            queueing = self.dm.get(name, {}).get("queueing", True)
            self.dm[name] = {"size": size_sectors, "queueing": queueing,
                             "paths": {d: old.get(d, "A") for d in devnums}}
            _write(os.path.join(self.root, "dev/mapper", name), "")
            return self._ok()

    def dm_message(self, name, message, devnum=None):
        self._count("dm_message")
        with self.lock:
            if name not in self.dm:
                return self._fail("device-mapper: message ioctl failed: No such device")
            if message in ("reinstate_path", "fail_path"):
                self.dm[name]["paths"][devnum] = "A" if message == "reinstate_path" else "F"
            elif message in ("fail_if_no_path", "queue_if_no_path"):
                self.dm[name]["queueing"] = message == "queue_if_no_path"
            return self._ok()

    def dm_status(self, name):
        self._count("dm_status")
        return dict(self.dm[name]["paths"]) if name in self.dm else None

    def dm_remove(self, name):
        self._count("dm_remove")
        with self.lock:
            if self.dm.pop(name, None) is None:
                return self._fail("Device %s not found" % name)
            _unlink(os.path.join(self.root, "dev/mapper", name))
            return self._ok()

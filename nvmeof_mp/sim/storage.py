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

    MD_UUID_PREFIX = "6e766d65:6f666d70:"      # as the daemon's marker

    def _md_uuid(self):
        self._md_serial = getattr(self, "_md_serial", 0) + 1
        return self.MD_UUID_PREFIX + "0000%04x:%08x" % (self._md_serial, self._md_serial)

    def md_create(self, name, devices, raid_devices):
        """As the daemon: every leg present and blank, the array UUID carries the marker."""
        self._count("md_create")
        with self.lock:
            if name in self.md:
                return self._fail("mdadm: /dev/md/%s is already in use." % name)
            if len(devices) != raid_devices:
                return self._fail("create needs all %d legs, %d given"
                                  % (raid_devices, len(devices)))
            ids = [self._identity_of(d) for d in devices]
            if None in ids:
                return self._fail("mdadm: cannot open %s: No such file or directory"
                                  % devices[ids.index(None)])
            if any(i in self.superblocks for i in ids):
                return self._fail("a leg carries an md superblock: not overwritten")
            uuid = self._md_uuid()
            for i in ids:
                self.superblocks[i] = {"name": name, "uuid": uuid, "events": 0}
            self._md_start(name, devices, raid_devices, uuid, 0)
            return self._ok("mdadm: array /dev/md/%s started." % name)

    def _md_start(self, name, devices, raid_devices, uuid, events):
        size = min(self._size_of(d) for d in devices) - 2048
        used = {m["minor"] for m in self.md.values()}
        minor = next(n for n in range(127, 0, -1) if n not in used)
        self.md[name] = {"legs": {d: "active" for d in devices}, "raid_devices": raid_devices,
                         "size": size, "minor": minor, "uuid": uuid, "events": events}
        _write(os.path.join(self.root, "dev/md%d" % minor), "")
        os.makedirs(os.path.join(self.root, "dev/md"), exist_ok=True)
        os.symlink("../md%d" % minor, os.path.join(self.root, "dev/md", name))
        _write(os.path.join(self.sys, "class/block/md%d/size" % minor), str(size))

    def _ours(self, name, sb):
        """The daemon's rule: the superblock names this array and carries the marker, or
        (made before the marker) names it exactly."""
        return sb is not None and sb["name"] == name

    def md_assemble(self, name, devices):
        """Assemble from legs with this array's superblock (the freshest start it, the others
        are re-added), or adopt the running array and re-add; md refuses to re-add a leg
        whose event count is ahead of the array's: left out, untouched."""
        self._count("md_assemble")
        with self.lock:
            sbs = {d: self.superblocks.get(self._identity_of(d)) for d in devices}
            bad = [d for d, sb in sbs.items() if not self._ours(name, sb)]
            if bad:
                return self._fail("%s: no superblock of array %s" % (", ".join(bad), name))
            uuids = {sb["uuid"] for sb in sbs.values()}
            if name in self.md:
                uuids.add(self.md[name]["uuid"])
            if len(uuids) != 1:
                return self._fail("legs of different arrays named %s" % name)
            if name not in self.md:
                top = max(sb["events"] for sb in sbs.values())
                fresh = [d for d, sb in sbs.items() if sb["events"] == top]
                self._md_start(name, fresh, max(2, len(devices)), uuids.pop(), top)
            md = self.md[name]
            left_out, readded = [], []
            for device in devices:
                ident = self._identity_of(device)
                if md["legs"].get(device) == "active":
                    continue
                if sbs[device]["events"] > md["events"]:
                    left_out.append([device, "mdadm: --re-add for %s to /dev/md/%s is not "
                                     "possible (its events are ahead)" % (device, name)])
                    continue
                for dev, state in list(md["legs"].items()):
                    if state == "faulty" and self._identity_of(dev) in (None, ident):
                        del md["legs"][dev]
                md["legs"][device] = "active"
                sbs[device]["events"] = md["events"]
                readded.append(device)
            return dict(self._ok("mdadm: /dev/md/%s has been started with %d drives." % (
                name, len(md["legs"]))), left_out=left_out, readded=readded)

    def md_add(self, name, device):
        self._count("md_add")
        with self.lock:
            ident = self._identity_of(device)
            if name not in self.md:
                return self._fail("mdadm: error opening /dev/md/%s" % name)
            if ident is None or ident in self.superblocks:
                return self._fail("%s is not blank: not added" % device)
            md = self.md[name]
            md["legs"][device] = "active"
            self.superblocks[ident] = {"name": name, "uuid": md["uuid"],
                                       "events": md["events"]}
            return self._ok("mdadm: added %s" % device)

    def md_write(self, name):
        """The VM writes: the event count of the array and of its active legs goes up."""
        with self.lock:
            md = self.md[name]
            md["events"] += 1
            for dev, state in md["legs"].items():
                ident = self._identity_of(dev)
                if state == "active" and ident in self.superblocks:
                    self.superblocks[ident]["events"] = md["events"]

    def md_fail(self, name, device):
        """md marks a leg faulty after an I/O error (failfast)."""
        with self.lock:
            self.md[name]["legs"][device] = "faulty"

    def md_stop(self, name, node=None):
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
            if list(md["legs"].values()).count("active") < md["raid_devices"]:
                from nvmeof_mp.privileged.storage import GROW_DEGRADED
                return self._fail(GROW_DEGRADED % ("/dev/md/" + name))
            md["size"] = min(self._size_of(d) for d, s in md["legs"].items()
                             if s == "active") - 2048
            _write(os.path.join(self.sys, "class/block/md%d/size" % md["minor"]), str(md["size"]))
            return self._ok()

    def md_examine(self, device):
        self._count("md_examine")
        sb = self.superblocks.get(self._identity_of(device))
        if not sb:
            return None
        return {"MD_LEVEL": "raid1", "MD_NAME": "any:" + sb["name"], "MD_UUID": sb["uuid"],
                "MD_EVENTS": str(sb["events"])}

    def dm_load(self, name, size_sectors, devnums):
        self._count("dm_load")
        with self.lock:
            old = self.dm.get(name, {"paths": {}})["paths"]
            queueing = self.dm.get(name, {}).get("queueing", True)
            minor = self.dm.get(name, {}).get("minor")
            if minor is None:       # a new map: /dev/mapper/<name> -> ../dm-N, as udev makes
                used = {m.get("minor") for m in self.dm.values()}
                minor = next(n for n in range(1 << 20) if n not in used)
                _write(os.path.join(self.root, "dev/dm-%d" % minor), "")
                os.makedirs(os.path.join(self.root, "dev/mapper"), exist_ok=True)
                os.symlink("../dm-%d" % minor, os.path.join(self.root, "dev/mapper", name))
            self.dm[name] = {"size": size_sectors, "queueing": queueing, "minor": minor,
                             "paths": {d: old.get(d, "A") for d in devnums}}
            node = os.path.join(self.sys, "devices/virtual/block/dm-%d" % minor)
            _write(os.path.join(node, "size"), str(size_sectors))
            _write(os.path.join(node, "dm/name"), name + "\n")
            _write(os.path.join(node, "dm/uuid"), "nvmeof_mp-" + name + "\n")
            link = os.path.join(self.sys, "class/block/dm-%d" % minor)
            if not os.path.islink(link):
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(node, link)
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
            dm = self.dm.pop(name, None)
            if dm is None:
                return self._fail("Device %s not found" % name)
            _unlink(os.path.join(self.root, "dev/mapper", name))
            _unlink(os.path.join(self.root, "dev/dm-%d" % dm["minor"]))
            _unlink(os.path.join(self.sys, "class/block/dm-%d" % dm["minor"]))
            shutil.rmtree(os.path.join(self.sys, "devices/virtual/block/dm-%d" % dm["minor"]),
                          ignore_errors=True)
            return self._ok()

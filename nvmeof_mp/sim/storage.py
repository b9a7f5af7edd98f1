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
            for role, i in enumerate(ids):
                self.superblocks[i] = {"name": name, "uuid": uuid, "events": 0, "role": role,
                                       "view": "A" * raid_devices}
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

    def _role(self, ident):
        """A leg's role: recorded in its superblock, else its place among the legs of its
        array (superblocks a test wrote by hand)."""
        sb = self.superblocks[ident]
        if "role" in sb:
            return sb["role"]
        return sorted(i for i, o in self.superblocks.items()
                      if o["uuid"] == sb["uuid"]).index(ident)

    def _md_update(self, md):
        """md writes its superblocks: a new event count, and the roles active now, on every
        active leg (a failed or absent one keeps what it last saw)."""
        md["events"] += 1
        active = [self._identity_of(d) for d, s in md["legs"].items() if s == "active"]
        roles = {self._role(i) for i in active if i in self.superblocks}
        view = "".join("A" if r in roles else "." for r in range(md["raid_devices"]))
        for ident in active:
            if ident in self.superblocks:
                self.superblocks[ident].update(events=md["events"], view=view,
                                               role=self._role(ident))

    def md_assemble(self, name, devices):
        """Assemble from legs with this array's superblock (the freshest start it: md kicks
        the others out as non-fresh), or adopt the running array.  Re-adds none: see
        ``md_re_add``."""
        self._count("md_assemble")
        with self.lock:
            if name in self.md_inactive:
                return dict(self._fail("an inactive array holds legs of %s" % name),
                            inactive=True)
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
                self._md_update(self.md[name])
            md = self.md[name]
            members = [d for d in devices if md["legs"].get(d) == "active"]
            return dict(self._ok("mdadm: /dev/md/%s has been started with %d drives." % (
                name, len(md["legs"]))), members=members)

    #: names of arrays udev's incremental assembly left inactive (a test sets it)
    md_inactive = frozenset()

    def md_stop_inactive(self, name, devices):
        self._count("md_stop_inactive")
        with self.lock:
            if name not in self.md_inactive:
                return self._fail("no inactive array of /dev/md/%s" % name)
            self.md_inactive = self.md_inactive - {name}
            return self._ok("mdadm: stopped an inactive array")

    def md_re_add(self, name, device):
        """As md: any leg of this array is taken back (split history or not: judging that is
        the caller's part) unless its event count is ahead of the array's."""
        self._count("md_re_add")
        with self.lock:
            md = self.md.get(name)
            ident = self._identity_of(device)
            sb = self.superblocks.get(ident)
            if md is None or sb is None or sb["uuid"] != md["uuid"]:
                return self._fail("mdadm: %s is not a leg of a running /dev/md/%s"
                                  % (device, name))
            if sb["events"] > md["events"]:
                return self._fail("mdadm: --re-add for %s to /dev/md/%s is not possible"
                                  % (device, name))
            for dev, state in list(md["legs"].items()):
                if state == "faulty" and self._identity_of(dev) in (None, ident):
                    del md["legs"][dev]
            md["legs"][device] = "active"
            self._md_update(md)
            return self._ok("mdadm: re-added %s" % device)

    def md_add(self, name, device):
        self._count("md_add")
        with self.lock:
            ident = self._identity_of(device)
            if name not in self.md:
                return self._fail("mdadm: error opening /dev/md/%s" % name)
            if ident is None or ident in self.superblocks:
                return self._fail("%s is not blank: not added" % device)
            md = self.md[name]
            used = {self._role(self._identity_of(d)) for d, s in md["legs"].items()
                    if s == "active" and self._identity_of(d) in self.superblocks}
            md["legs"][device] = "active"
            self.superblocks[ident] = {"name": name, "uuid": md["uuid"],
                                       "events": md["events"],
                                       "role": min(set(range(md["raid_devices"])) - used)}
            self._md_update(md)
            return self._ok("mdadm: added %s" % device)

    def md_write(self, name):
        """The VM writes: the event count of the array and of its active legs goes up."""
        with self.lock:
            self._md_update(self.md[name])

    def md_fail(self, name, device):
        """md marks a leg faulty after an I/O error (failfast)."""
        with self.lock:
            self.md[name]["legs"][device] = "faulty"
            self._md_update(self.md[name])

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
        with self.lock:
            count = sum(o["uuid"] == sb["uuid"] for o in self.superblocks.values())
            return {"MD_LEVEL": "raid1", "MD_NAME": "any:" + sb["name"],
                    "MD_UUID": sb["uuid"], "MD_EVENTS": str(sb["events"]),
                    "MD_DEVICE_ROLE": str(self._role(self._identity_of(device))),
                    "MD_ARRAY_STATE": sb.get("view", "A" * max(2, count))}

    def dm_create(self, name, size_sectors, devnums):
        self._count("dm_create")
        with self.lock:
            if name in self.dm:
                return self._fail("device-mapper: create ioctl failed: Device or resource "
                                  "busy")
            return self._dm_load(name, size_sectors, devnums)

    def dm_reload(self, name, size_sectors, devnums):
        self._count("dm_reload")
        with self.lock:
            if name not in self.dm:
                return self._fail("Device %s not found" % name)
            return self._dm_load(name, size_sectors, devnums)

    def _dm_load(self, name, size_sectors, devnums):
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

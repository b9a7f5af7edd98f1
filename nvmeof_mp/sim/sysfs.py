"""The simulated kernel's own behaviour: the sysfs and /dev entries of controllers,
subsystems, namespace heads and paths, made and removed as Linux 6.1 does (a mixin of
:class:`.host.SimHost`, which holds the state)."""

from __future__ import annotations

import itertools
import os
import shutil

from nvmeof_mp.sim.files import unlink as _unlink, write as _write
from nvmeof_mp.sim.model import HOST_ID, SimController

#: udev gives a new node its group and mode, then records the device in its database (with
#: what its rules found, such as multipath-tools' mark): a window in which the node opens but
#: udev's verdict is not readable yet (systemd-udevd: node update, then database update)
UDEV_DB_LAG = 0.05


class SimSysfs:
    """Controllers, subsystems and namespaces in the simulated sysfs tree."""

    def _ctrl_dir(self, name):
        return os.path.join(self.sys, "devices/virtual/nvme-fabrics/ctl", name)

    def _subsys_dir(self, sname):
        return os.path.join(self.sys, "devices/virtual/nvme-subsystem", sname)

    def _create_controller(self, target, portal, hostnqn, opts):
        used = {c.instance for c in self.ctrls.values()}
        inst = next(i for i in itertools.count() if i not in used)
        name = "nvme%d" % inst
        if target.nqn not in self.subsystems:
            used_s = {i for _, i in self.subsystems.values()}
            sinst = next(i for i in itertools.count() if i not in used_s)
            sname = "nvme-subsys%d" % sinst
            self.subsystems[target.nqn] = (sname, sinst)
            sdir = self._subsys_dir(sname)
            os.makedirs(sdir)
            for attr, value in (("subsysnqn", target.nqn), ("iopolicy", "numa"),
                                ("model", "sim-nvmet"), ("subsystype", "nvm")):
                _write(os.path.join(sdir, attr), value)
            os.symlink("../../devices/virtual/nvme-subsystem/" + sname,
                       os.path.join(self.sys, "class/nvme-subsystem", sname))
        sname = self.subsystems[target.nqn][0]
        ctrl = SimController(name, inst, sname, target.nqn, portal, hostnqn,
                             hostid=opts.get("host_id") or HOST_ID)
        cdir = self._ctrl_dir(name)
        os.makedirs(cdir)
        attrs = {"state": "live", "transport": portal.transport, "subsysnqn": target.nqn,
                 "address": _address(portal, live=True),
                 "hostnqn": hostnqn, "hostid": opts.get("host_id") or HOST_ID,
                 "cntlid": str(inst + 1), "kato": str(opts.get("keep_alive_tmo") or 5),
                 "ctrl_loss_tmo": _shown(opts.get("ctrl_loss_tmo", 600)),
                 "reconnect_delay": str(opts.get("reconnect_delay", 10)),
                 "fast_io_fail_tmo": _shown(opts.get("fast_io_fail_tmo", -1))}
        for attr, value in attrs.items():
            _write(os.path.join(cdir, attr), value)
        os.symlink("../../devices/virtual/nvme-fabrics/ctl/" + name,
                   os.path.join(self.sys, "class/nvme", name))
        os.symlink("../../nvme-fabrics/ctl/" + name, os.path.join(self._subsys_dir(sname), name))
        self.ctrls[name] = ctrl
        return ctrl

    def _set_state(self, ctrl, state):
        if ctrl.name not in self.ctrls:
            return
        ctrl.state = state
        cdir = self._ctrl_dir(ctrl.name)
        _write(os.path.join(cdir, "state"), state)
        p = ctrl.portal
        if state == "live":
            self._scan(ctrl.name)
        _write(os.path.join(cdir, "address"), _address(p, live=state == "live"))

    def _scan(self, name):
        """Namespace scan of a live controller: add new namespaces, resize known ones."""
        with self.lock:
            ctrl = self.ctrls.get(name)
            if ctrl is None or ctrl.state != "live":
                return
            target = self.targets[ctrl.nqn]
            for ns in target.namespaces:
                if ns.nsid in target.hidden_nsids:
                    continue
                if ns.nsid in ctrl.namespaces:
                    self._resize_devices(ctrl, ns)
                    continue
                if self._duplicate_ids(ctrl.nqn, ns):
                    self.log.append("nvme %s: ignoring nsid %d because of duplicate IDs"
                                    % (name, ns.nsid))
                    continue
                self._add_namespace(ctrl, ns)

    def _ids(self, ns):
        return [i for i in (ns.uuid, ns.nguid) if i]

    def _duplicate_ids(self, nqn, ns):
        """Is this uuid/nguid already shown by a namespace of another connected subsystem?"""
        return any(self.shown.get(i, {}).keys() - {nqn} for i in self._ids(ns))

    def _show(self, nqn, ns, delta):
        for i in self._ids(ns):
            per = self.shown.setdefault(i, {})
            per[nqn] = per.get(nqn, 0) + delta
            if per[nqn] <= 0:
                del per[nqn]

    def _head(self, ctrl, ns):
        key = (ctrl.nqn, ns.nsid)
        if key not in self.heads:
            used = {i for (n, _), (i, _) in self.heads.items() if n == ctrl.nqn}
            inst = next(i for i in itertools.count(1) if i not in used)
            sinst = self.subsystems[ctrl.nqn][1]
            self.heads[key] = (inst, "nvme%dn%d" % (sinst, inst))
        return self.heads[key]

    def _ns_attrs(self, ns, hidden):
        nguid = _uuid_form(ns.nguid) if ns.nguid else "00000000-0000-0000-0000-000000000000"
        return {"uuid": ns.uuid or "00000000-0000-0000-0000-000000000000", "nguid": nguid,
                "wwid": "uuid.%s" % ns.uuid if ns.uuid else "eui.%s" % (ns.nguid or ""),
                "nsid": str(ns.nsid), "size": str(ns.size_sectors), "hidden": str(hidden)}

    def _add_namespace(self, ctrl, ns):
        self._show(ctrl.nqn, ns, 1)
        inst, head_name = self._head(ctrl, ns)
        if self.native:
            sdir = self._subsys_dir(ctrl.subsys)
            hdir = os.path.join(sdir, head_name)
            if not os.path.isdir(hdir):
                self._make_block(hdir, head_name, self._ns_attrs(ns, 0),
                                 "../../devices/virtual/nvme-subsystem/%s/%s" % (ctrl.subsys,
                                                                               head_name))
            pname = "nvme%dc%dn%d" % (self.subsystems[ctrl.nqn][1], ctrl.instance, inst)
            attrs = dict(self._ns_attrs(ns, 1), ana_state=ctrl.portal.ana,
                         ana_grpid=str(ns.ana_group))
            self._make_block(os.path.join(self._ctrl_dir(ctrl.name), pname), pname, attrs,
                             "../../devices/virtual/nvme-fabrics/ctl/%s/%s" % (ctrl.name, pname),
                             dev_node=False)
            ctrl.namespaces[ns.nsid] = head_name
        else:
            dname = "nvme%dn%d" % (ctrl.instance, inst)
            self._make_block(os.path.join(self._ctrl_dir(ctrl.name), dname), dname,
                             self._ns_attrs(ns, 0),
                             "../../devices/virtual/nvme-fabrics/ctl/%s/%s" % (ctrl.name, dname))
            ctrl.namespaces[ns.nsid] = dname

    def _make_block(self, d, name, attrs, link, dev_node=True):
        os.makedirs(d)
        if dev_node:
            attrs = dict(attrs, dev="259:%d" % next(self.minors))
        for attr, value in attrs.items():
            _write(os.path.join(d, attr), value)
        os.symlink(link, os.path.join(self.sys, "class/block", name))
        if dev_node:
            os.makedirs(os.path.join(self.sys, "dev/block"), exist_ok=True)
            os.symlink(d, os.path.join(self.sys, "dev/block", attrs["dev"]))
            node = os.path.join(self.root, "dev", name)
            _write(node, "")
            if self.udev_delay is None:
                os.chmod(node, 0o660)
            else:                       # devtmpfs makes it root-only; udev sets group disk
                os.chmod(node, 0o600)
                data = os.path.join(self.root, "run/udev/data", "b" + attrs["dev"])
                self.clock.at(self.udev_delay, lambda: os.chmod(node, 0o660))
                self.clock.at(self.udev_delay + UDEV_DB_LAG, lambda: _write(
                    data, "E:ID_NSID=1\n" + self._udev_rules_say(name)))
            self._new_block_device(name, attrs["dev"])      # a multipathd may claim it

    def can_open(self, path):
        """The caller's permission check: root, or group disk once udev set mode 0660."""
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        return self.caller_root or mode & 0o060 == 0o060

    def _resize_devices(self, ctrl, ns):
        for d in (self._path_dir(ctrl, ns.nsid), self._device_dir(ctrl, ns.nsid)):
            if d and os.path.isdir(d):
                _write(os.path.join(d, "size"), str(ns.size_sectors))

    def _path_dir(self, ctrl, nsid):
        if not self.native or nsid not in ctrl.namespaces:
            return None
        inst = self.heads[(ctrl.nqn, nsid)][0]
        return os.path.join(self._ctrl_dir(ctrl.name), "nvme%dc%dn%d" % (
            self.subsystems[ctrl.nqn][1], ctrl.instance, inst))

    def _device_dir(self, ctrl, nsid):
        name = ctrl.namespaces.get(nsid)
        if name is None:
            return None
        if self.native:
            return os.path.join(self._subsys_dir(ctrl.subsys), name)
        return os.path.join(self._ctrl_dir(ctrl.name), name)

    def _delete(self, name):
        ctrl = self.ctrls.pop(name, None)
        if ctrl is None:
            return
        by_nsid = {n.nsid: n for n in self.targets[ctrl.nqn].namespaces}
        for nsid, dev in ctrl.namespaces.items():
            if nsid in by_nsid:
                self._show(ctrl.nqn, by_nsid[nsid], -1)
            d = self._path_dir(ctrl, nsid) if self.native else self._device_dir(ctrl, nsid)
            if d:
                _unlink(os.path.join(self.sys, "class/block", os.path.basename(d)))
            if not self.native:
                _unlink(os.path.join(self.root, "dev", dev))
        shutil.rmtree(self._ctrl_dir(name), ignore_errors=True)
        _unlink(os.path.join(self.sys, "class/nvme", name))
        _unlink(os.path.join(self._subsys_dir(ctrl.subsys), name))
        if not any(c.nqn == ctrl.nqn for c in self.ctrls.values()):
            sname = ctrl.subsys
            for (nqn, nsid), (_, head) in list(self.heads.items()):
                if nqn == ctrl.nqn:
                    _unlink(os.path.join(self.sys, "class/block", head))
                    _unlink(os.path.join(self.root, "dev", head))
                    del self.heads[(nqn, nsid)]
            shutil.rmtree(self._subsys_dir(sname), ignore_errors=True)
            # kernfs allocates inode numbers cyclically, a disk filesystem reuses them at
            # once: park the old link so a re-created subsystem gets a new inode, as in sysfs
            os.makedirs(os.path.join(self.root, "graveyard"), exist_ok=True)
            os.rename(os.path.join(self.sys, "class/nvme-subsystem", sname),
                      os.path.join(self.root, "graveyard", "%s-%d" % (sname, next(self.minors))))
            del self.subsystems[ctrl.nqn]


def _address(portal, live):
    """A controller's sysfs ``address``: a live tcp one adds its ``src_addr``, rdma never."""
    addr = "traddr=%s,trsvcid=%s" % (portal.traddr, portal.trsvcid)
    if live and portal.transport == "tcp":
        addr += ",src_addr=%s" % portal.traddr
    return addr


def _shown(value):
    """How sysfs shows a timeout: a negative one (infinite) as ``off``."""
    return "off" if value in ("off", "-1") or (isinstance(value, int) and value < 0) else str(
        value)


def _uuid_form(hexstr):
    h = hexstr.replace("-", "").lower()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])

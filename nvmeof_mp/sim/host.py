"""A simulated NVMe-oF host: a sysfs tree in a directory plus a fake kernel.

The fake kernel implements the same ``Kernel`` interface as the privileged one and changes the
tree the way Linux 6.1 does (layouts and values from the lab's captures, see
doc/source/kernel-facts.rst):

* controllers ``nvmeN`` (lowest free instance) under ``devices/virtual/nvme-fabrics/ctl``;
  subsystems ``nvme-subsysS``; with native multipath a head ``nvmeSnK`` in the subsystem and a
  hidden path ``nvmeScNnK`` per controller, without it a plain ``nvmeNnK`` per controller;
* a duplicate connect fails with "already connected"; a namespace whose uuid/nguid exists in
  another subsystem is ignored ("duplicate IDs");
* namespaces appear asynchronously (``ns_delay``), a controller whose portal goes down moves to
  ``connecting`` and its ``address`` loses ``src_addr``;
* time is a ``FakeClock``: waiting costs no wall time and events fire as the clock advances.
"""

from __future__ import annotations

import errno as errnolib
import itertools
import os
import threading

from nvmeof_mp.kernel import Kernel
from nvmeof_mp.hostinfo import FAST_IO_FAIL_SINCE, release_tuple
from nvmeof_mp.sim.files import write as _write
from nvmeof_mp.sim.inuse import SimInUse, SimMultipathd
from nvmeof_mp.sim.model import (HOST_ID, HOST_NQN, SYSTEM_UUID, FakeClock, SimNamespace,
                                 SimPortal, SimTarget)
from nvmeof_mp.sim.storage import SimStorage
from nvmeof_mp.sim.sysfs import SimSysfs, _shown

class SimHost(SimSysfs, SimStorage, SimInUse, SimMultipathd, Kernel):
    """The fake kernel plus the target side, writing a sysfs tree below ``root``."""

    def __init__(self, root, native_multipath=True, clock=None, ns_delay=0.05,
                 with_identity=True, connect_cost=0.0, udev_delay=None,
                 kernel_release="6.1.0-sim-amd64"):
        super().__init__()
        self.root = root
        # Linux before 5.11 has no fast_io_fail_tmo: its fabrics parser refuses the option
        self.kernel_release = kernel_release
        _write(os.path.join(root, "proc/sys/kernel/osrelease"), kernel_release + "\n")
        self.clock = clock or FakeClock()
        self.ns_delay = ns_delay
        self.connect_cost = connect_cost
        self.native = native_multipath
        self.udev_delay = udev_delay  # None: no udev running; else seconds to process an event
        # the connector's process: a service user in group disk (like the gate's), or root
        self.caller_root = False
        if udev_delay is not None:
            _write(os.path.join(root, "run/udev/control"), "")
        self.targets = {}
        self.ctrls = {}
        self.subsystems = {}          # nqn -> (subsys name, instance)
        self.heads = {}               # (nqn, nsid) -> (head instance, name)
        self.flushed = []
        self.md = {}                  # alias -> {"legs": {dev: state}, "raid_devices", "size"}
        self.superblocks = {}         # (nqn, nsid) -> {name, uuid, events}: on the target's data
        self.dm = {}                  # name -> {"size": sectors, "paths": {devnum: "A"|"F"}}
        self.minors = itertools.count()
        self.shown = {}               # uuid/nguid -> {nqn: number of controllers showing it}
        self.flush_error = None
        self.secrets = {}             # nqn -> the DH-HMAC-CHAP host key the target requires
        self.ctrl_secrets = {}        # nqn -> the target's controller key (bidirectional)
        self.flush_hangs = set()      # device paths whose flush never completes
        self.log = []                 # kernel messages, like dmesg
        self.lock = threading.RLock()
        self.sys = os.path.join(root, "sys")
        for d in ("devices/virtual/nvme-fabrics/ctl", "devices/virtual/nvme-subsystem",
                  "class/nvme", "class/nvme-subsystem", "class/block",
                  "module/nvme_core/parameters", "class/dmi/id", "module/nvme_auth"):
            os.makedirs(os.path.join(self.sys, d), exist_ok=True)
        os.makedirs(os.path.join(root, "dev"), exist_ok=True)
        _write(os.path.join(self.sys, "module/nvme_core/parameters/multipath"),
               "Y" if native_multipath else "N")
        _write(os.path.join(self.sys, "class/dmi/id/product_uuid"), SYSTEM_UUID + "\n")
        if with_identity:
            _write(os.path.join(root, "etc/nvme/hostnqn"), HOST_NQN + "\n")
            _write(os.path.join(root, "etc/nvme/hostid"), HOST_ID + "\n")

    # -- target side ---------------------------------------------------------------------------

    def add_target(self, nqn, portals, namespaces):
        """portals: [(traddr, trsvcid[, transport])]; namespaces: [SimNamespace or dict]."""
        ps = [SimPortal(p[0], str(p[1]), p[2] if len(p) > 2 else "tcp") for p in portals]
        nss = [n if isinstance(n, SimNamespace) else SimNamespace(**n) for n in namespaces]
        self.targets[nqn] = SimTarget(nqn, ps, nss)
        return self.targets[nqn]

    def portal(self, nqn, trsvcid):
        return next(p for p in self.targets[nqn].portals if p.trsvcid == str(trsvcid))

    def add_namespace(self, nqn, ns):
        """Map a new namespace on the target (visible after a rescan or an AEN)."""
        self.targets[nqn].namespaces.append(ns)

    def resize(self, nqn, nsid, size_sectors):
        for ns in self.targets[nqn].namespaces:
            if ns.nsid == nsid:
                ns.size_sectors = size_sectors

    def path_down(self, nqn, trsvcid):
        """The target closes the port: controllers go to ``connecting``, src_addr vanishes."""
        with self.lock:
            p = self.portal(nqn, trsvcid)
            p.mode = "refuse"
            for c in self._ctrls_on(p, nqn):
                self._set_state(c, "connecting")
                self._start_loss_timer(c)

    def path_up(self, nqn, trsvcid):
        with self.lock:
            p = self.portal(nqn, trsvcid)
            p.mode = "up"
            for c in self._ctrls_on(p, nqn):
                self.clock.at(1.0, lambda c=c: self._set_state(c, "live"))

    def _start_loss_timer(self, ctrl):
        """The kernel gives a lost controller up after ctrl_loss_tmo ("off": never), counting
        with the value it has when it checks (an attach may raise it meanwhile)."""
        ctrl.outages += 1
        self._loss_check(ctrl, ctrl.outages, self.clock.now)

    def _loss_check(self, ctrl, outage, since):
        with self.lock:
            if (self.ctrls.get(ctrl.name) is not ctrl or ctrl.outages != outage
                    or ctrl.state == "live"):
                return
            with open(os.path.join(self._ctrl_dir(ctrl.name), "ctrl_loss_tmo")) as f:
                tmo = f.read().strip()
            if tmo == "off" or int(tmo) < 0:
                return
            left = since + int(tmo) - self.clock.now
            if left <= 0:
                self._delete(ctrl.name)
            else:
                self.clock.at(left, lambda: self._loss_check(ctrl, outage, since))

    def expire(self, name):
        """ctrl_loss_tmo ran out: the kernel deletes the controller by itself."""
        with self.lock:
            self._delete(name)

    def _ctrls_on(self, portal, nqn):
        return [c for c in self.ctrls.values() if c.nqn == nqn and c.portal is portal]

    # -- Kernel interface ----------------------------------------------------------------------

    def connect_all(self, opts_list, hold=None):
        """One privileged call on a real host ("connect_all"); each portal is still counted
        as a "connect" (one controller creation)."""
        self._count("connect_all")
        return super().connect_all(opts_list, hold)

    def connect(self, opts, hold=None):
        self._count("connect")
        if hold is not None:
            self._store().hold(self.root, **hold)
        if self.connect_cost:
            self.clock.sleep(self.connect_cost)
        with self.lock:
            target = self.targets.get(opts["nqn"])
            key = (opts["traddr"], str(opts["trsvcid"]), opts["transport"])
            portal = next((p for p in target.portals if p.key == key), None) if target else None
            hostnqn = opts.get("host_nqn") or HOST_NQN
            hostid = opts.get("host_id") or HOST_ID
            clash = self._host_clash(hostnqn, hostid)
            too_old = release_tuple(self.kernel_release) < FAST_IO_FAIL_SINCE
            if clash or ("fast_io_fail_tmo" in opts and too_old):
                return {"error": "Failed to write to /dev/nvme-fabrics: Invalid argument",
                        "errno": errnolib.EINVAL, "already": False}
            for c in self.ctrls.values():
                if (c.nqn == opts["nqn"] and c.portal.key == key and c.hostnqn == hostnqn
                        and c.state != "deleting"):
                    return {"error": "already connected", "errno": 1, "already": True}
            if portal is None or portal.mode == "refuse":
                return {"error": "Failed to write to /dev/nvme-fabrics: Connection refused",
                        "errno": errnolib.ECONNREFUSED, "already": False}
            refused = self._auth_refused(opts)
            if refused:
                return refused
            if portal.mode != "timeout":
                return self._connected(target, portal, hostnqn, opts)
        self.clock.sleep(3.0)
        return {"error": "Failed to write to /dev/nvme-fabrics: Connection timed out",
                "errno": errnolib.ETIMEDOUT, "already": False}

    def _auth_refused(self, opts):
        """The kernel's DH-HMAC-CHAP verdict (6.12): no host key for a target that requires
        one is ENOKEY, a wrong host or controller key EKEYREJECTED; None: authenticated."""
        need, ctrl = self.secrets.get(opts["nqn"]), self.ctrl_secrets.get(opts["nqn"])
        if not os.path.isdir(os.path.join(self.sys, "module/nvme_auth")):
            opts = dict(opts, dhchap_secret=None, dhchap_ctrl_secret=None)  # 6.1: ignored
        if need is not None and not opts.get("dhchap_secret"):
            return {"error": "Failed to write to /dev/nvme-fabrics: Required key not available",
                    "errno": errnolib.ENOKEY, "already": False}
        if need not in (None, opts.get("dhchap_secret")) or (
                opts.get("dhchap_ctrl_secret") not in (None, ctrl)):
            return {"error": "Failed to write to /dev/nvme-fabrics: Key was rejected by "
                    "service", "errno": errnolib.EKEYREJECTED, "already": False}
        return None

    def _host_clash(self, hostnqn, hostid):
        """The kernel's host table: one host ID per host NQN and back (the default host is
        this host's NQN and ID).  -> the kernel's complaint, or None."""
        hosts = {(HOST_NQN, HOST_ID)} | {(c.hostnqn, c.hostid) for c in self.ctrls.values()}
        for nqn, hid in hosts:
            if hid == hostid and nqn != hostnqn:
                msg = "found same hostid %s but different hostnqn %s" % (hostid, hostnqn)
            elif nqn == hostnqn and hid != hostid:
                msg = "found same hostnqn %s but different hostid %s" % (hostnqn, hostid)
            else:
                continue
            self.log.append("nvme_fabrics: " + msg)
            return msg
        return None

    def _connected(self, target, portal, hostnqn, opts):
        with self.lock:
            ctrl = self._create_controller(target, portal, hostnqn, opts)
            if portal.mode == "stuck":
                self._set_state(ctrl, "connecting")
            else:
                self.clock.at(self.ns_delay, lambda: self._scan(ctrl.name))
            return {"controller": ctrl.name}

    def delete_controller(self, name):
        self._count("delete_controller")
        with self.lock:
            if name not in self.ctrls:
                return "/sys/class/nvme/%s/delete_controller: No such file or directory" % name
            self._delete(name)
            return None

    def rescan_controllers(self, names):
        self._count("rescan_controllers")
        with self.lock:
            for name in names:
                if name in self.ctrls:
                    self._scan(name)
            return {n: None for n in names}

    def set_controller_attrs(self, name, attrs):
        self._count("set_controller_attrs")
        with self.lock:
            for attr, value in attrs.items():
                _write(os.path.join(self._ctrl_dir(name), attr), _shown(value))
            return {a: None for a in attrs}

    def flush_device(self, path, timeout=None):
        """A flush into a device no path can serve queues (dm queue_if_no_path, a controller
        reconnecting); so does one into a path of ``flush_hangs`` (a target that never
        answers).  The daemon gives up after ``timeout``; without one it would wait forever."""
        self._count("flush_device")
        self.flushed.append(path)
        dm = self.dm.get(path[len("/dev/mapper/"):]) if path.startswith("/dev/mapper/") else None
        if dm is not None and not dm.get("queueing", True) and path in self.flush_hangs:
            return "flush %s: Input/output error" % path    # failed legs, nothing queues
        if path in self.flush_hangs or self._flush_queues(path):
            if timeout is None:
                raise AssertionError("flush of %s would hang forever" % path)
            self.clock.sleep(timeout)
            return "flush %s: no answer after %gs" % (path, timeout)
        return self.flush_error

    def read_first_sector(self, path):
        """Root's read of a device node of the simulated host (paths as the host sees them)."""
        self._count("read_first_sector")
        from nvmeof_mp import blockdev
        return blockdev.read_first_sector(os.path.join(self.root, path.lstrip("/")))

    def _flush_queues(self, path):
        with self.lock:
            if path.startswith("/dev/mapper/"):
                dm = self.dm.get(path[len("/dev/mapper/"):])
                return bool(dm and dm.get("queueing", True)
                            and "A" not in dm["paths"].values())
            name = os.path.basename(path)
            ctrls = [c for c in self.ctrls.values() if name in c.namespaces.values()]
            return bool(ctrls) and not any(c.state == "live" for c in ctrls)

    def namespace_size(self, device):
        """Identify Namespace: the target-side size, whatever the host's sysfs shows."""
        self._count("namespace_size")
        with self.lock:
            ident = self._identity_of(device)
            if ident is None:
                return None
            ns = next((n for n in self.targets[ident[0]].namespaces if n.nsid == ident[1]), None)
            return ns.size_sectors * 512 if ns else None

    def ensure_host_identity(self):
        self._count("ensure_host_identity")
        from nvmeof_mp.privileged.host import ensure_identity_files
        return ensure_identity_files(self.root)

    def read_system_uuid(self):
        self._count("read_system_uuid")
        return SYSTEM_UUID

    # -- views for tests -----------------------------------------------------------------------

    def controllers(self, nqn=None):
        return sorted(n for n, c in self.ctrls.items() if nqn is None or c.nqn == nqn)

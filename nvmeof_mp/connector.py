"""NVMeOFConnector: the os-brick style connector API, as thin orchestration.

Parsing is in ``connection``, sysfs reading in ``topology``, decisions in ``plan``, portal
connection in ``attach``, md and dm in ``raid`` / ``devmapper``, root actions behind ``kernel``,
path status and heal in ``health``.
"""

from __future__ import annotations

import os
import threading

from oslo_log import log as logging

from nvmeof_mp import connection
from nvmeof_mp.attach import Attacher
from nvmeof_mp.connection import Mode
from nvmeof_mp.exception import (DetachAborted, NVMeOFError, VolumeDeviceNotFound,
                                 VolumePathsNotFound)
from nvmeof_mp.health import Health
from nvmeof_mp.hostinfo import HostInfo, connector_properties
from nvmeof_mp.kernel import PrivilegedKernel
from nvmeof_mp.plan import find_namespace
from nvmeof_mp.topology import SysfsReader
from nvmeof_mp.waiting import Clock

LOG = logging.getLogger(__name__)
DEV_SEARCH_PATH = "/dev/"


class NVMeOFConnector(Health):
    """Attach NVMe-oF volumes: single path, native multipath, md RAID1, dm-multipath."""

    def __init__(self, root_helper=None, driver=None, use_multipath=False,
                 device_scan_attempts=5, *args, kernel=None, root="/",
                 clock=None, policy=None, lock_path=None, connect_method=None, conf=None,
                 can_open=None, enforce_multipath=False, **kwargs):
        self._root_helper = root_helper
        self.enforce_multipath = enforce_multipath      # Nova passes it to the factory
        self.driver = driver
        self.use_multipath = use_multipath
        self.device_scan_attempts = device_scan_attempts
        if policy is None or (kernel is None and connect_method is None):
            from nvmeof_mp import config
            conf = config.register(conf)
            policy = policy or config.policy_from_conf(conf)
            connect_method = connect_method or conf[config.GROUP].connect_method
        if kernel is None:
            from nvmeof_mp import privileged
            privileged.init(root_helper)
            kernel = PrivilegedKernel(connect_method)
        self.kernel = kernel
        self.root = root
        self.sysfs = SysfsReader(os.path.join(root, "sys"))
        self.hostinfo = HostInfo(root, kernel=kernel)
        self.clock = clock or Clock()
        self.policy = policy
        from nvmeof_mp.locks import default_lock_path
        self.lock_path = lock_path or default_lock_path()     # resolved once, not per lock
        self._identity = None
        self._identity_lock = threading.Lock()
        from nvmeof_mp.registry import Registry
        self.registry = Registry(kernel, root)
        self.attacher = Attacher(kernel, self.sysfs, self.clock, self.policy,
                                 self.host_identity, self.lock_path, root, can_open,
                                 self.registry)

    # -- properties ----------------------------------------------------------------------------

    @staticmethod
    def get_connector_properties(root_helper, *args, **kwargs):
        """os-brick's NVMe-oF keys (nqn, nvme_hostid, uuid, system uuid, nvme_native_multipath)
        plus the generic ones and what this host can do per mode (``nvmeof_mp``)."""
        kernel = kwargs.get("kernel")
        if kernel is None:
            from nvmeof_mp.kernel import LazyKernel
            kernel = LazyKernel(root_helper)
        info = HostInfo(kwargs.get("root", "/"), kernel=kernel)
        return connector_properties(info, multipath=kwargs.get("multipath", False),
                                    enforce_multipath=kwargs.get("enforce_multipath", False),
                                    host=kwargs.get("host"))

    def host_identity(self):
        """(hostnqn, hostid), read once per connector (created once if missing)."""
        with self._identity_lock:
            if self._identity is None or not self._identity[0]:
                self._identity = self.hostinfo.identity()
            return self._identity

    def wait_udev(self, path, timeout=10.0):
        """Wait until udev has processed the device behind ``path`` (md, dm).

        The rule is ``udev_settled``'s without the caller's access check: the md and dm paths
        handed out are links udev makes, so only "never" skips the wait.
        """
        from nvmeof_mp.topology import udev_settled
        from nvmeof_mp.waiting import poll
        name = os.path.basename(os.path.realpath(os.path.join(self.root, path.lstrip("/"))))
        mode = self.policy.wait_for_udev
        if not poll(lambda: udev_settled(self.root, name, mode), timeout, self.clock):
            LOG.warning("udev has not processed %s after %ss", path, timeout)

    @staticmethod
    def get_search_path():
        return DEV_SEARCH_PATH

    def native_multipath(self):
        return self.hostinfo.native_multipath()

    # -- connect -------------------------------------------------------------------------------

    def _volume_lock(self, request, lock_path=None):
        """Attach, heal, extend and detach of one volume exclude each other."""
        from nvmeof_mp.locks import volume_lock
        return volume_lock(request.volume_key, lock_path or self.lock_path)

    def lock_path_of(self, record):
        """The lock directory of a registered volume: the one of the process that attached it
        when this process may use it (root: the heal timer), else this process's own."""
        from nvmeof_mp.locks import service_directory
        theirs = (record or {}).get("lock_path")
        if theirs and theirs != self.lock_path:
            return service_directory(theirs) or self.lock_path
        return self.lock_path

    def connect_volume(self, connection_properties):
        """Attach the volume; returns ``{'type': 'block', 'path': '/dev/...'}`` plus details."""
        request = connection.parse(connection_properties)
        if LOG.isEnabledFor(logging.DEBUG):      # redacting costs ~2 ms under emulation
            LOG.debug("connect_volume %s", connection.redact(connection_properties))
        self._check_multipath(request)
        with self._volume_lock(request):
            self._recover_around(request)
            return self._connect_registered(request, connection_properties)

    def _recover_around(self, request):
        """Finish or roll back what crashed processes left on this volume's subsystems."""
        from nvmeof_mp import recovery
        self.registry.ensure_boot()
        recovery.neighbours(self, request)

    def _connect_registered(self, request, info):
        """Attach with the registry: the record says ``attaching`` before the first controller
        is made (in the same privileged call that holds the subsystem), ``attached`` after."""
        from nvmeof_mp import registry as reg
        key = request.volume_key
        previous = self.registry.get(key)
        if self.registry.interrupted(previous):
            LOG.info("Finishing the %s of %s that process %s left unfinished",
                     previous["state"][:-3], request.describe(), previous["owner"].get("pid"))
        if previous is not None and previous["state"] == reg.ATTACHED:
            # attached already (Nova attaches again after a host restart of the instance):
            # the record stays as it is, its references too; no registry call
            result = self._connect(request)
            result.pop("_created", None)
            return result
        pending = self.registry.record(request, info, reg.ATTACHING, previous, "attach",
                                       lock_path=self.lock_path)
        joined = self._joined_path(request)
        if joined and os.path.exists(os.path.join(self.root, joined.lstrip("/"))):
            pending[0].update(state=reg.ATTACHED, adopted=True)   # made before the registry
        early = None if request.replicated else _EarlyRecord(self.registry, pending[0])
        try:
            result = self._connect(request, pending, early)
        except BaseException:
            if early is not None:
                early.join()
            self._attach_failed(key, pending[0])
            raise
        if early is not None and early.join():
            result.pop("_created", None)
            return result
        rec = pending[0]
        created = {"controllers": sorted(set(result.pop("_created", [])) | {
            c for r in result.get("replicas") or () for c in r.get("created") or ()})}
        if joined and not rec.get("adopted") and result["path"] == joined:
            created[request.mode.value] = joined
        rec.update(state=reg.ATTACHED, device=result["path"], owner=reg.owner(),
                   created=created)
        reg.add_event(rec, "attached at %s%s" % (result["path"], " (degraded)"
                                                 if result.get("degraded") else ""))
        self.registry.put(rec, None)
        return result

    def _joined_path(self, request):
        """The md or dm device of a replicated volume, None otherwise."""
        if request.mode is Mode.RAID:
            from nvmeof_mp import raid
            return raid.device_path(request)
        if request.mode is Mode.DEVICE_MAPPER:
            from nvmeof_mp import devmapper
            return devmapper.device_path(request)
        return None

    def _attach_failed(self, key, rec):
        """A failed attach (already undone) leaves no record, unless the volume was attached
        before it (then its record stays as it was)."""
        from nvmeof_mp import registry as reg
        try:
            if rec["state"] == reg.ATTACHING:
                if self.registry.get(key) is not None:
                    self.registry.drop(key)
            else:       # adopted: attached before this call, it stays so
                self.registry.event(key, "attach failed: the volume stays as it was")
        except Exception:       # noqa: BLE001 - the attach's own error is what matters
            LOG.exception("Could not update the attachment registry after a failed attach")

    def _check_multipath(self, request):
        """os-brick's rule: multipath requested and enforced, but nvme_core multipath is off
        -> refuse before touching anything; requested only -> a warning.  dm-multipath mode
        needs device-mapper instead (checked by ``devmapper``)."""
        if request.mode is Mode.DEVICE_MAPPER or not self.use_multipath:
            return
        if self.native_multipath():
            return
        if request.enforce_multipath or self.enforce_multipath:
            from nvmeof_mp.exception import UnsupportedHost
            raise UnsupportedHost(reason="multipath is enforced but nvme_core multipath is off "
                                  "(/sys/module/nvme_core/parameters/multipath is N)")

    def _connect(self, request, pending=None, on_connected=None):
        """Attach (or heal); ``pending``: the registry record (and secrets) to write before
        the first controller is made, None for a heal of a registered volume;
        ``on_connected``: see ``Attacher.attach`` (single target)."""
        if request.mode is Mode.RAID:
            from nvmeof_mp import raid
            return raid.connect(self, request, pending)
        if request.mode is Mode.DEVICE_MAPPER:
            from nvmeof_mp import devmapper
            return devmapper.connect(self, request, pending)
        all_portals = request.mode is Mode.MULTIPATH and self._use_native(request)
        att = self.attacher.attach(request.target, all_portals, key=request.volume_key,
                                   pending=pending, on_connected=on_connected)
        LOG.info("Attached %s at %s (%s)", request.describe(), att.device, att.summary())
        details = att.as_dict()
        return {"type": "block", "path": att.device, "degraded": details["degraded"],
                "paths": details["paths"], "failed_portals": details["failed_portals"],
                "_created": list(att.created)}

    def _use_native(self, request):
        if not self.use_multipath:
            LOG.debug("Multipath not requested: using the first portal that works")
            return False
        if not self.native_multipath():
            LOG.warning("nvme_core multipath is off: connecting one portal of %s only",
                        request.target.nqn)
            return False
        return True

    # -- disconnect ----------------------------------------------------------------------------

    def disconnect_volume(self, connection_properties, device_info=None, force=False,
                          ignore_errors=False):
        """Detach the volume; a volume that is not attached is a no-op.

        As os-brick: a failed flush (or md stop / dm remove) raises at once and leaves the
        volume attached, unless ``force``, which goes on (data may be lost) and still raises
        at the end; ``ignore_errors`` turns what is left to raise into log lines.
        """
        request = connection.parse(connection_properties)
        with self._volume_lock(request):
            self._recover_around(request)
            errors = self.detach_request(request, force)
        if errors:
            msg = "Detach of %s: %s" % (request.describe(), "; ".join(errors))
            if not ignore_errors:
                raise NVMeOFError(msg)
            LOG.warning("%s (ignored)", msg)
        LOG.info("Detached %s", request.describe())

    def detach_request(self, request, force):
        """Detach with the registry (the caller holds the volume lock): the record says
        ``detaching`` before the flush and goes with the last controller decision; a refused
        detach leaves it ``attached``."""
        from nvmeof_mp import registry as reg
        key = request.volume_key
        if self.registry.get(key) is not None:
            self.registry.event(key, "detach" + (" (force)" if force else ""),
                                state=reg.DETACHING, owner=reg.owner())
        try:
            errors = self._disconnect(request, force)
        except DetachAborted as e:
            self.registry.event(key, "detach refused: %s" % e, state=reg.ATTACHED,
                                owner=reg.owner())
            raise
        if self.registry.get(key) is not None:
            self.registry.drop(key)
        return errors

    def _disconnect(self, request, force):
        if request.mode is Mode.RAID:
            from nvmeof_mp import raid
            errors = raid.disconnect(self, request, force=force)
        elif request.mode is Mode.DEVICE_MAPPER:
            from nvmeof_mp import devmapper
            errors = devmapper.disconnect(self, request, force=force)
        else:
            errors = self.attacher.detach(request.target, force=force, key=request.volume_key,
                                          drop=True)
        return errors

    # -- queries -------------------------------------------------------------------------------

    def get_volume_paths(self, connection_properties, device_info=None):
        """Device paths of the volume if it is attached, [] otherwise."""
        request = connection.parse(connection_properties)
        if request.mode is Mode.RAID:
            from nvmeof_mp import raid
            return raid.volume_paths(self, request)
        if request.mode is Mode.DEVICE_MAPPER:
            from nvmeof_mp import devmapper
            return devmapper.volume_paths(self, request)
        ns = find_namespace(request.target, self.sysfs.snapshot([request.target.nqn]))
        return [ns.device] if ns else []

    def check_valid_device(self, path, run_as_root=True):
        """True when the first sector of ``path`` can be read: as root with ``run_as_root``
        (os-brick reads it with ``dd`` through the root helper: Cinder's service user may not
        open the device), else as the calling process.  Answers within
        ``blockdev.READ_TIMEOUT`` even when no path of the device is usable."""
        from nvmeof_mp import blockdev
        if run_as_root:
            try:
                error = self.kernel.read_first_sector(path)
            except NVMeOFError as e:        # not a device of ours (the daemon refuses it)
                error = str(e)
        else:
            error = blockdev.read_first_sector(path)
        if error:
            LOG.info("Device %s is not valid: %s", path, error)
        return error is None

    def extend_volume(self, connection_properties):
        """Rescan and return the new size in bytes (md/dm grown when replicated)."""
        request = connection.parse(connection_properties)
        with self._volume_lock(request):
            return self._extend(request)

    def _extend(self, request):
        if request.replicated:
            from nvmeof_mp import raid, devmapper
            module = raid if request.mode is Mode.RAID else devmapper
            return module.extend(self, request)
        device, old, new = self.rescan_and_wait(request.target)
        LOG.info("Extended %s: %d -> %d bytes", device, old, new)
        return new

    def rescan_and_wait(self, target, timeout=10.0):
        """Bring the host to the size the target reports now, and return it.

        The target's size comes from Identify Namespace: when sysfs already shows it (the
        usual case: the target's event made the kernel rescan), nothing waits; otherwise the
        live controllers are rescanned and sysfs is polled until it shows that size (at most
        ``timeout``).  Without Identify the old way: rescan and wait for any change.
        sysfs ``size`` is in 512-byte sectors whatever the LBA format (4 KiB too).
        Returns (device, old size, new size) in bytes; new == old when nothing changed.
        """
        from nvmeof_mp.waiting import poll
        snap = self.sysfs.snapshot([target.nqn])
        ns = find_namespace(target, snap)
        if ns is None:
            raise VolumePathsNotFound()
        live = [c.name for c in snap.controllers(target.nqn) if c.live]
        if not live:
            raise VolumeDeviceNotFound(device=ns.device)
        wanted = self.kernel.namespace_size(ns.device)
        if wanted == ns.size_bytes:
            return ns.device, ns.size_bytes, ns.size_bytes
        self.kernel.rescan_controllers(live)

        def size_now():
            now = find_namespace(target, self.sysfs.snapshot([target.nqn]))
            return now.size_bytes if now else None

        if wanted:
            seen = poll(lambda: size_now() == wanted, timeout, self.clock)
            new = wanted if seen else (size_now() or ns.size_bytes)
            if not seen:
                LOG.warning("%s: the target reports %d bytes, the host shows %d after %ss",
                            ns.device, wanted, new, timeout)
            return ns.device, ns.size_bytes, new

        def grown():
            size = size_now()
            return size if size and size != ns.size_bytes else None
        return ns.device, ns.size_bytes, poll(grown, timeout, self.clock) or ns.size_bytes


class _EarlyRecord:
    """Writes a single-target volume's ``attached`` record while the attach waits for the
    kernel to show the device (the privileged call overlaps the wait instead of following
    it); ``join()`` -> True when it was written.  A failed attach joins it before its record
    is dropped.  A crash between this write and the return leaves an attached record whose
    controllers exist: kept, never rolled back under a user."""

    def __init__(self, registry, record):
        self.registry = registry
        self.record = record
        self.thread = None
        self.done = False

    def __call__(self, created):
        from nvmeof_mp import registry as reg
        rec = dict(self.record, state=reg.ATTACHED, owner=reg.owner(),
                   created={"controllers": sorted(created)})
        if rec.get("adopted"):
            rec["created"] = self.record.get("created") or {}
        reg.add_event(rec, "attached")

        def write():
            try:
                self.registry.put(rec, None)
                self.done = True
            except Exception:       # noqa: BLE001 - the caller writes it again
                LOG.exception("Writing the attached record of %s failed", rec["key"])
        self.thread = threading.Thread(target=write, name="nvmeof-record", daemon=True)
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join()
        return self.done


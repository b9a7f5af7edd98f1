"""The boundary between the connector and the kernel's privileged side.

``Kernel`` is the one small interface every root action goes through.  ``PrivilegedKernel``
implements it with the privsep entrypoints (nvme-cli, or one write to /dev/nvme-fabrics);
the simulated host of the tests implements the same interface with a fake kernel that
creates and removes sysfs entries like Linux does.
"""

from __future__ import annotations

import abc
import collections
import threading


class _Raised:
    def __init__(self, error):
        self.error = error


class Kernel(abc.ABC):
    """Root actions the connector needs.  Every call here is one privileged call."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = collections.Counter()

    def _count(self, name):
        with self._lock:
            self.calls[name] += 1

    @abc.abstractmethod
    def connect(self, opts: dict, hold=None) -> dict:
        """Create a controller.  -> {'controller': 'nvmeN'} or {'error', 'errno', 'already'}.
        ``hold``: ``registry_hold``'s arguments, applied in the same call before connecting
        (the volume's record is written before its first controller exists)."""

    def connect_all(self, opts_list: list, hold=None) -> list:
        """Create one controller per option set, all in flight together; replies in order
        (an exception in place of a reply when one connect raised)."""
        from nvmeof_mp import threads
        from nvmeof_mp.exception import NVMeOFError
        if hold is not None:
            self._store().hold(self.root, **hold)

        def one(opts):
            try:
                return self.connect(opts)
            except NVMeOFError as e:
                return e
            except Exception as e:      # raised below, once no connect is in flight any more
                return _Raised(e)
        replies = threads.map_concurrently("connect", one, opts_list)
        for reply in replies:
            if isinstance(reply, _Raised):
                raise reply.error
        return replies

    @abc.abstractmethod
    def delete_controller(self, name: str) -> str | None:
        """Delete a controller; returns an error text or None."""

    @abc.abstractmethod
    def rescan_controllers(self, names) -> dict:
        """Rescan namespaces of live controllers."""

    @abc.abstractmethod
    def set_controller_attrs(self, name: str, attrs: dict) -> dict:
        """Write tunable timeout attributes of a controller."""

    @abc.abstractmethod
    def flush_device(self, path: str, timeout: float | None = None) -> str | None:
        """Flush a block device's buffers; returns an error text or None.  Gives up after
        ``timeout`` seconds (an error) when the device does not answer."""

    @abc.abstractmethod
    def read_first_sector(self, path: str) -> str | None:
        """Read a device's first sector as root (bounded in time); None or an error text."""

    @abc.abstractmethod
    def exclusive_busy(self, devices) -> dict:
        """{device: reason} for the NVMe-oF namespaces of ``devices`` (``/dev/nvmeXnY``) that
        an exclusive open fails on (mounted, held by md/dm/LVM, swap, open with O_EXCL), or
        whose open does not return in bounded time; the others are left out.  A device that
        is not an NVMe-oF namespace refuses the whole call (``PrivilegedArgumentError``)."""

    @abc.abstractmethod
    def ensure_host_identity(self) -> tuple[str, str]:
        """Create /etc/nvme/hostnqn and hostid if missing; return (hostnqn, hostid)."""

    @abc.abstractmethod
    def read_system_uuid(self) -> str | None:
        """The system UUID (root-only readable on real hosts)."""

    def namespace_size(self, device: str) -> int | None:
        """The size in bytes the target reports now for the namespace behind ``device``
        (Identify Namespace), or None when it cannot be learned."""
        return None

    # The attachment registry (``privileged.registry``): files only root writes.  Here for a
    # kernel whose registry lives in a tree of its own (the simulated host's ``root``);
    # ``PrivilegedKernel`` goes through the daemon.

    def _store(self):
        from nvmeof_mp.privileged import registry
        return registry

    def registry_put(self, key, record, secret_info=None):
        self._count("registry_put")
        self._store().put(self.root, key, record, secret_info)

    def registry_hold(self, key, nqn, host_nqn, adopted, owner, record=None,
                      secret_info=None):
        self._count("registry_hold")
        self._store().hold(self.root, key, nqn, host_nqn, adopted, owner, record, secret_info)

    def registry_release(self, key, nqn, host_nqn, controllers, devices, drop=False) -> dict:
        """Delete ``controllers`` unless another volume holds the subsystem or one of
        ``devices`` is busy; drop the reference.  {'deleted', 'kept', 'errors'}"""
        self._count("registry_release")
        return self._store().release(self.root, key, nqn, host_nqn, list(controllers),
                                     list(devices), self.delete_controller,
                                     self.exclusive_busy, drop)

    def registry_drop(self, key):
        self._count("registry_drop")
        self._store().drop(self.root, key)

    def registry_reconcile(self) -> bool:
        store = self._store()
        return store.reconcile(self.root, store.current_boot_id(self.root))

    # md RAID1 and dm-multipath: each returns {'ok', 'out', 'error'} unless said otherwise

    @abc.abstractmethod
    def md_create(self, name, devices, raid_devices) -> dict: ...

    @abc.abstractmethod
    def md_assemble(self, name, devices) -> dict:
        """Assemble or adopt /dev/md/<name> from ``devices`` (legs carrying its superblock);
        ``members``: the given legs the running array holds."""

    @abc.abstractmethod
    def md_stop_inactive(self, name, devices) -> dict:
        """Stop the inactive array of these legs that udev's incremental assembly left."""

    @abc.abstractmethod
    def md_re_add(self, name, device) -> dict:
        """``--re-add`` a leg of this array (the caller judged it merely behind)."""

    @abc.abstractmethod
    def md_add(self, name, device) -> dict:
        """``--add`` a blank leg (no md superblock) to the running array."""

    @abc.abstractmethod
    def md_stop(self, name, node=None) -> dict:
        """Stop /dev/md/<name>; ``node`` (``/dev/mdN``) when its link may be gone."""

    @abc.abstractmethod
    def md_grow(self, name) -> dict: ...

    @abc.abstractmethod
    def md_examine(self, device) -> dict | None:
        """The leg's md superblock as ``mdadm --examine --export`` keys, or None."""

    @abc.abstractmethod
    def dm_create(self, name, size_sectors, devnums) -> dict:
        """Create the map; refused when a map of that name exists."""

    @abc.abstractmethod
    def dm_reload(self, name, size_sectors, devnums) -> dict:
        """Reload our existing map with these paths and size."""

    @abc.abstractmethod
    def dm_message(self, name, message, devnum=None) -> dict: ...

    @abc.abstractmethod
    def dm_status(self, name) -> dict | None:
        """{'major:minor': 'A' | 'F'} for the map's paths, None when there is no map."""

    @abc.abstractmethod
    def dm_remove(self, name) -> dict: ...


# The privsep daemon runs privileged.DAEMON_THREADS (32) calls at once, and connect calls wait
# inside it for their turn at the kernel, which makes one controller at a time.  Uncapped,
# forty concurrent attaches would hold every daemon thread, and a detach's flush or delete
# would wait behind them.  Fewer connect calls in flight cost nothing: the queue stays full.
CONNECT_CALLS_IN_FLIGHT = 24
_connect_slots = threading.BoundedSemaphore(CONNECT_CALLS_IN_FLIGHT)


class PrivilegedKernel(Kernel):
    """The real kernel, through the privsep daemon."""

    def __init__(self, connect_method="fabrics"):
        super().__init__()
        self.connect_method = connect_method

    def _count(self, name):
        from nvmeof_mp import privileged
        privileged.ensure_started()
        super()._count(name)

    def connect(self, opts, hold=None):
        from nvmeof_mp.privileged import nvme
        self._count("connect")
        with _connect_slots:
            return nvme.connect_portal(opts, self.connect_method, hold)

    def connect_all(self, opts_list, hold=None):
        """One privileged call for every portal of an attach (the daemon queues the writes
        behind earlier attaches', see ``privileged.nvme``)."""
        from nvmeof_mp.privileged import nvme
        if len(opts_list) == 1:
            return [self.connect(opts_list[0], hold)]
        replies = []
        for i in range(0, len(opts_list), nvme.MAX_PORTALS):
            self._count("connect_all")
            with _connect_slots:
                replies += nvme.connect_portals(list(opts_list[i:i + nvme.MAX_PORTALS]),
                                                self.connect_method, hold if i == 0 else None)
        return replies

    def delete_controller(self, name):
        from nvmeof_mp.privileged import nvme
        self._count("delete_controller")
        return nvme.delete_controller(name)

    def rescan_controllers(self, names):
        from nvmeof_mp.privileged import nvme
        self._count("rescan_controllers")
        return nvme.rescan_controllers(list(names))

    def set_controller_attrs(self, name, attrs):
        from nvmeof_mp.privileged import nvme
        self._count("set_controller_attrs")
        return nvme.set_controller_attrs(name, dict(attrs))

    def flush_device(self, path, timeout=None):
        from nvmeof_mp.privileged import host
        self._count("flush_device")
        return host.flush_device(path, timeout)

    def namespace_size(self, device):
        from nvmeof_mp.privileged import nvme
        self._count("namespace_size")
        reply = nvme.identify_namespace_size(device)
        if reply.get("error"):
            import logging
            logging.getLogger(__name__).debug("Identify Namespace: %s", reply["error"])
        return reply.get("size")

    def read_first_sector(self, path):
        from nvmeof_mp.privileged import host
        self._count("read_first_sector")
        return host.read_first_sector(path)

    def exclusive_busy(self, devices):
        from nvmeof_mp.privileged import host
        self._count("exclusive_busy")
        return host.exclusive_busy(list(devices))

    def ensure_host_identity(self):
        from nvmeof_mp.privileged import host
        self._count("ensure_host_identity")
        return tuple(host.ensure_host_identity())

    def read_system_uuid(self):
        from nvmeof_mp.privileged import host
        self._count("read_system_uuid")
        return host.read_system_uuid()

    def _storage(self, op, *args):
        from nvmeof_mp.privileged import dmsetup, storage
        self._count(op)
        return getattr(dmsetup if op.startswith("dm_") else storage, op)(*args)

    def md_create(self, name, devices, raid_devices):
        return self._storage("md_create", name, list(devices), raid_devices)

    def md_assemble(self, name, devices):
        return self._storage("md_assemble", name, list(devices))

    def md_re_add(self, name, device):
        return self._storage("md_re_add", name, device)

    def md_stop_inactive(self, name, devices):
        return self._storage("md_stop_inactive", name, list(devices))

    def md_add(self, name, device):
        return self._storage("md_add", name, device)

    def md_stop(self, name, node=None):
        return self._storage("md_stop", name, node)

    def md_grow(self, name):
        return self._storage("md_grow", name)

    def md_examine(self, device):
        return self._storage("md_examine", device)

    def dm_create(self, name, size_sectors, devnums):
        return self._storage("dm_create", name, size_sectors, list(devnums))

    def dm_reload(self, name, size_sectors, devnums):
        return self._storage("dm_reload", name, size_sectors, list(devnums))

    def dm_message(self, name, message, devnum=None):
        return self._storage("dm_message", name, message, devnum)

    def dm_status(self, name):
        return self._storage("dm_status", name)

    def dm_remove(self, name):
        return self._storage("dm_remove", name)

    # the attachment registry: the daemon writes it (root-owned files)

    def registry_put(self, key, record, secret_info=None):
        from nvmeof_mp.privileged import registry
        self._count("registry_put")
        registry.registry_put(key, record, secret_info)

    def registry_hold(self, key, nqn, host_nqn, adopted, owner, record=None,
                      secret_info=None):
        from nvmeof_mp.privileged import registry
        self._count("registry_hold")
        registry.registry_hold(key, nqn, host_nqn, adopted, owner, record, secret_info)

    def registry_release(self, key, nqn, host_nqn, controllers, devices, drop=False):
        from nvmeof_mp.privileged import registry
        self._count("registry_release")
        return registry.registry_release(key, nqn, host_nqn, list(controllers), list(devices),
                                         drop)

    def registry_drop(self, key):
        from nvmeof_mp.privileged import registry
        self._count("registry_drop")
        registry.registry_drop(key)

    def registry_reconcile(self):
        from nvmeof_mp.privileged import registry
        self._count("registry_reconcile")
        return registry.registry_reconcile()


class LazyKernel:
    """A PrivilegedKernel made on first use: commands that may need no root action (such as
    ``nvmeof-mp properties``) do not import oslo.privsep or start the daemon."""

    def __init__(self, root_helper=None, connect_method="fabrics"):
        self._args = (root_helper, connect_method)
        self._kernel = None

    def __getattr__(self, name):
        if self._kernel is None:
            from nvmeof_mp import privileged
            privileged.init(self._args[0])
            self._kernel = PrivilegedKernel(self._args[1])
        return getattr(self._kernel, name)

"""DeviceMapper multipath over ``dm_replicas``: one map whose paths are the replicas.

The kernel refuses a namespace whose UUID/NGUID exists in another subsystem, so replicas carry
distinct identities and neither the kernel nor multipathd's WWID grouping can know they belong
together: the connection information says so, and this module builds the map itself, named
after the top-level ``vol_uuid``, with ``queue_if_no_path`` and round-robin over the replicas.

Monitoring: the map's DM uuid starts with ``nvmeof_mp-`` (not ``mpath-``), so multipathd does not
adopt or rebuild it; failed paths are reinstated by ``check_paths`` / ``nvmeof-mp heal`` and by
every attach of the volume (a returning replica is re-loaded into the map).
"""

from __future__ import annotations

from oslo_log import log as logging

from nvmeof_mp import replicas
from nvmeof_mp.exception import NVMeOFError, ReplicaError, UnsupportedHost
from nvmeof_mp.locks import named_lock

LOG = logging.getLogger(__name__)


def map_name(request):
    return request.vol_uuid


def device_path(request):
    return "/dev/mapper/" + map_name(request)


def _usable(connector):
    return connector.hostinfo.tool("dmsetup")


def load_step(status):
    """``dm_reload`` when the map exists (its ``dm_status``), else ``dm_create``."""
    return "dm_create" if status is None else "dm_reload"


def connect(connector, request, pending=None):
    if not _usable(connector):
        if request.enforce_multipath or connector.enforce_multipath:
            raise UnsupportedHost(reason="enforce_multipath is set but dmsetup (device-mapper) "
                                  "is not installed")
        LOG.warning("dmsetup is missing: %s attaches without a dm-multipath map",
                    request.describe())
    existed = replicas.exists(connector, device_path(request))
    results = replicas.attach_all(connector, request, pending)
    legs = [att for _, att, _ in results if att]
    sizes = {att.device: att.namespace.size_sectors for att in legs}
    small = _smaller_than_the_map(connector, request, legs, sizes) if existed else {}
    legs = [att for att in legs if att.device not in small]
    if not _usable(connector):
        return {"type": "block", "path": legs[0].device, "degraded": True,
                "replicas": replicas.leg_report(results)}
    name = map_name(request)
    loaded = []
    try:
        devnums = [replicas.block_attr(connector, att.device, "dev") for att in legs]
        if None in devnums:
            raise ReplicaError(reason="cannot read the device number of %s" % ", ".join(
                a.device for a, d in zip(legs, devnums, strict=True) if d is None))
        size = min(sizes[att.device] for att in legs)
        with named_lock("dm-" + name, connector.lock_path):
            loaded.append(name)
            load = load_step(connector.kernel.dm_status(name))
            replicas.require_ok(getattr(connector.kernel, load)(name, size, devnums),
                                "dm-multipath map load")
            status = connector.kernel.dm_status(name) or {}
            for dev in devnums:
                if status.get(dev) == "F":
                    connector.kernel.dm_message(name, "reinstate_path", dev)
        connector.wait_udev(device_path(request))
    except Exception:
        remove = None
        if loaded and not existed:
            remove = lambda: connector.kernel.dm_remove(name)       # noqa: E731
        replicas.undo(connector, results, "dm attach of %s failed" % name, remove)
        raise
    degraded = len(legs) < len(request.targets) or any(a.degraded for a in legs)
    (LOG.warning if degraded else LOG.info)(
        "Attached %s at %s%s", request.describe(), device_path(request),
        " (DEGRADED)" if degraded else "")
    report = replicas.leg_report(results)
    for entry in report:
        if entry["device"] in small:
            entry.update(degraded=True, error=small[entry["device"]])
    return {"type": "block", "path": device_path(request), "degraded": degraded,
            "replicas": report}


def _smaller_than_the_map(connector, request, legs, sizes):
    """{device: why} of the replicas smaller than the running map (it grew while they were
    away): each is rescanned first (``sizes`` updated), and one still smaller (its target
    has not caught up) is left out of the map, which is never cut down under the data
    written past its end.  None fits: ReplicaError, the map stays as it is."""
    current = int(replicas.block_attr(connector, device_path(request), "size") or 0)
    for att in legs:
        if sizes[att.device] < current:
            try:
                sizes[att.device] = connector.rescan_and_wait(att.target)[2] // 512
            except NVMeOFError as e:
                LOG.info("%s: rescan of %s failed: %s", request.describe(), att.device, e)
    small = {att.device: "smaller than the map (%d < %d sectors): left out, it would cut the "
             "map down" % (sizes[att.device], current)
             for att in legs if sizes[att.device] < current}
    for device, why in small.items():
        LOG.warning("%s: replica %s %s", request.describe(), device, why)
    if small and len(small) == len(legs):
        raise ReplicaError(reason="%s: every replica attached is smaller than the map (%d "
                           "sectors): not reloaded" % (request.describe(), current))
    return small


def disconnect(connector, request, force=False):
    """Flush, stop queueing so nothing hangs, remove the map, then the replicas.

    With no active path in the map a flush could only queue: the detach fails at once, or
    with ``force`` the map stops queueing first (queued I/O fails) and is removed.
    """
    name, kernel = map_name(request), connector.kernel

    def dead():
        status = kernel.dm_status(name)
        return status is not None and "A" not in status.values()
    return replicas.teardown(connector, request, device_path(request),
                             lambda: kernel.dm_remove(name), force, dead=dead,
                             unqueue=lambda: kernel.dm_message(name, "fail_if_no_path"))


def volume_paths(connector, request):
    path = device_path(request)
    return [path] if replicas.exists(connector, path) else []


def extend(connector, request):
    # the attached replicas: a degraded map grows over them, the heal reloads it with all
    legs = replicas.rescan_legs(connector, request)
    size = min(new for _, _, new in legs) // 512
    devnums = [replicas.block_attr(connector, dev, "dev") for dev, _, _ in legs]
    replicas.require_ok(connector.kernel.dm_reload(map_name(request), size, devnums),
                        "dm-multipath map reload")
    return size * 512

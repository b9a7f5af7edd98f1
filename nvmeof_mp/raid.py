"""RAID1 over ``volume_replicas``: md joins the replicas' block devices.

Create when no leg carries an md superblock (internal bitmap, failfast, ``missing`` for legs
that could not be attached); otherwise assemble, or adopt the array udev's incremental
assembly may already have started, and re-add legs that return.
The array is ``/dev/md/<alias>``.
"""

from __future__ import annotations

from oslo_log import log as logging

from nvmeof_mp import replicas, threads
from nvmeof_mp.locks import named_lock

LOG = logging.getLogger(__name__)


def device_path(request):
    return "/dev/md/" + request.alias


def connect(connector, request):
    """Attach the legs and create, assemble or adopt the array.

    Any failure undoes what this call made (the legs' new controllers, and the array when it
    did not exist before the call) and is raised.
    """
    path = device_path(request)
    existed = replicas.exists(connector, path)
    results = replicas.attach_all(connector, request)
    legs = [att.device for _, att, _ in results if att]
    kernel = connector.kernel
    started = []
    try:
        with named_lock("md-" + request.alias, connector.lock_path):
            if (replicas.exists(connector, path)
                    or any(kernel.md_examine(leg) for leg in legs)):
                # running, auto-assembled by udev, or to assemble: adopt and (re-)add legs
                started.append("assemble")
                replicas.require_ok(kernel.md_assemble(request.alias, legs),
                                    "mdadm --assemble")
            else:
                started.append("create")
                replicas.require_ok(
                    kernel.md_create(request.alias, legs, request.replica_count),
                    "mdadm --create")
        connector.wait_udev(path)
    except Exception:
        stop = None
        if not existed and (started or replicas.exists(connector, path)):
            stop = lambda: kernel.md_stop(request.alias)      # noqa: E731
        replicas.undo(connector, results, "RAID attach of %s failed" % request.alias, stop)
        raise
    degraded = len(legs) < request.replica_count or any(
        att is None or att.degraded for _, att, _ in results)
    (LOG.warning if degraded else LOG.info)(
        "Attached %s at %s%s", request.describe(), path, " (DEGRADED)" if degraded else "")
    return {"type": "block", "path": path, "degraded": degraded,
            "replicas": replicas.leg_report(results)}


def disconnect(connector, request, force=False):
    """Flush and stop the array (a degraded one too), then disconnect every leg.  The stop
    waits (bounded) for udev's pending events, see ``replicas.udev_idle``."""
    def stop():
        replicas.udev_idle(connector)
        return connector.kernel.md_stop(request.alias)
    return replicas.teardown(connector, request, device_path(request), stop, force)


def extend(connector, request):
    old = int(replicas.block_attr(connector, device_path(request), "size") or 0) * 512
    threads.map_concurrently("extend", connector.rescan_and_wait, request.targets)
    replicas.require_ok(connector.kernel.md_grow(request.alias), "mdadm --grow")
    new = int(replicas.block_attr(connector, device_path(request), "size") or 0) * 512
    LOG.info("Extended %s: %d -> %d bytes", device_path(request), old, new)
    return new

"""Connecting the replicas of a replicated volume (RAID1 legs or dm-multipath paths).

Every replica is attached concurrently through the same ``Attacher`` as a single volume
(each may itself be native-multipathed), with the leg timeout policy so a lost replica fails
I/O over in about a second.  A replica that cannot be attached is reported, not fatal.
"""

from __future__ import annotations

import concurrent.futures
import os

from oslo_log import log as logging

from nvmeof_mp.exception import DetachAborted, NVMeOFError, ReplicaError

LOG = logging.getLogger(__name__)


def attach_all(connector, request):
    """-> list of (target, TargetAttachment or None, error or None), in request order."""
    def one(target):
        all_portals = len(target.portals) > 1 and connector.native_multipath()
        try:
            return target, connector.attacher.attach(target, all_portals, replica_leg=True), None
        except NVMeOFError as e:
            LOG.warning("Replica %s of %s could not be attached: %s", target.describe(),
                        request.describe(), e)
            return target, None, e
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(request.targets)) as pool:
        results = list(pool.map(one, request.targets))
    if not any(att for _, att, _ in results):
        raise ReplicaError(reason="no replica of %s could be attached: %s" % (
            request.describe(), "; ".join(str(e) for _, _, e in results)))
    return results


def undo(connector, results, why):
    """Remove the controllers these attaches created (nothing left behind after a failure)."""
    for _, att, _ in results:
        if att and att.created:
            connector.attacher.remove_controllers(att.created, why)


def exists(connector, path):
    return os.path.exists(os.path.join(connector.root, path.lstrip("/")))


def teardown(connector, request, path, remove, force):
    """Flush the joined device, ``remove()`` it (md stop / dm remove), then detach the replicas.

    A failed step raises ``DetachAborted`` unless ``force``: the replicas must not go away
    under a device that still holds unwritten data.  Returns the list of error texts.
    """
    errors = []
    if exists(connector, path):
        err = connector.kernel.flush_device(path)
        if err:
            if not force:       # the replicas must not go away under unwritten data
                raise DetachAborted(what=path, reason=err)
            errors.append(err)
        result = remove()
        if not result["ok"]:
            if not force:
                raise DetachAborted(what=path, reason=result["error"])
            errors.append(result["error"])
    for target in request.targets:
        errors += connector.attacher.detach(target, flush=False, force=force)
    return errors


def leg_report(results):
    return [{"nqn": t.nqn, "device": att.device if att else None,
             "degraded": att.degraded if att else True,
             "error": str(err) if err else None} for t, att, err in results]


def block_attr(connector, device, attr):
    """Read /sys/class/block/<dev>/<attr> for a /dev path (symlinks like /dev/md/x resolved)."""
    dev = os.path.realpath(os.path.join(connector.root, device.lstrip("/")))
    path = os.path.join(connector.root, "sys/class/block", os.path.basename(dev), attr)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def require_ok(result, what):
    if not result.get("ok"):
        raise ReplicaError(reason="%s failed: %s" % (what, result.get("error")))
    return result

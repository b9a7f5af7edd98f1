"""Connecting the replicas of a replicated volume (RAID1 legs or dm-multipath paths).

Every replica is attached concurrently through the same ``Attacher`` as a single volume
(each may itself be native-multipathed), with the leg timeout policy so a lost replica fails
I/O over in about a second.  A replica that cannot be attached is reported, not fatal.
"""

from __future__ import annotations

import os

from oslo_log import log as logging

from nvmeof_mp import threads
from nvmeof_mp.exception import (DetachAborted, ForeignClaim, NVMeOFError, ReplicaError,
                                 VolumeDeviceNotFound, VolumePathsNotFound)
from nvmeof_mp.waiting import poll

LOG = logging.getLogger(__name__)
REMOVE_RETRY = 5.0      # seconds a forced detach keeps trying to stop the array / remove the map


def attach_all(connector, request, pending=None):
    """-> list of (target, TargetAttachment or None, error or None), in request order.

    ``pending``: the volume's registry record (and secrets), written before any replica is
    attached (each replica then holds its subsystem for the volume).

    A replica that fails with an NVMeOFError is reported; any other exception (a privsep
    transport error, a bug) undoes the replicas attached meanwhile and is raised.
    """
    def one(target):
        all_portals = len(target.portals) > 1 and connector.native_multipath()
        try:
            return target, connector.attacher.attach(target, all_portals, replica_leg=True,
                                                     key=request.volume_key), None
        except ForeignClaim as e:      # not a lost replica: a host misconfiguration, raised
            return target, None, e
        except NVMeOFError as e:
            LOG.warning("Replica %s of %s could not be attached: %s", target.describe(),
                        request.describe(), e)
            return target, None, e
        except Exception as e:      # noqa: BLE001 - raised below, after the undo
            return target, None, e
    if pending is not None:
        connector.registry.put(*pending)
    results = threads.map_concurrently("replicas", one, request.targets)
    unexpected = [e for _, _, e in results if e is not None and (
        not isinstance(e, NVMeOFError) or isinstance(e, ForeignClaim))]
    if unexpected:
        undo(connector, results, "attach of %s failed" % request.describe())
        raise unexpected[0]
    if not any(att for _, att, _ in results):
        raise ReplicaError(reason="no replica of %s could be attached: %s" % (
            request.describe(), "; ".join(str(e) for _, _, e in results)))
    return results


def undo(connector, results, why, remove=None):
    """Put the host back as it was after a failed connect: ``remove()`` the md array or dm map
    this connect made (None when it existed before: a heal must not tear down a running
    volume), then delete the controllers these attaches created.  Never raises: the caller
    re-raises the original error."""
    if remove is not None:
        try:
            result = remove()
            if not result.get("ok"):
                LOG.debug("Undo (%s): %s", why, result.get("error"))
        except Exception:
            LOG.exception("Undo (%s) could not remove the joined device", why)
    for _, att, _ in results:
        if att and att.created:
            try:
                connector.attacher.remove_controllers(att.created, why)
            except Exception:
                LOG.exception("Undo (%s) could not delete %s", why, ", ".join(att.created))


UDEV_QUEUE = "run/udev/queue"      # exists while udev has events queued (libudev's test)
UDEV_QUEUE_WAIT = 5.0


def udev_idle(connector, timeout=UDEV_QUEUE_WAIT):
    """Wait, at most ``timeout`` seconds, until udev has no events queued.

    Before an md array stops: a leg's change event (a resize) that udev handles after the
    stop runs ``mdadm --incremental`` on the freed leg, which starts an array of its own over
    the legs, left behind once they are gone.  Without udev there is no queue file.
    """
    queue = os.path.join(connector.root, UDEV_QUEUE)
    if not os.path.exists(queue):
        return True
    if poll(lambda: not os.path.exists(queue), timeout, connector.clock):
        return True
    LOG.info("udev still has events queued after %ss: going on", timeout)
    return False


def exists(connector, path):
    return os.path.exists(os.path.join(connector.root, path.lstrip("/")))


def teardown(connector, request, path, remove, force, dead=None, unqueue=None):
    """Flush the joined device, ``remove()`` it (md stop / dm remove), then detach the replicas.

    A failed step raises ``DetachAborted`` unless ``force``: the replicas must not go away
    under a device that still holds unwritten data.  ``dead()`` says that no path can serve a
    flush (it would only queue): the detach then stops at once.  With ``force``, ``unqueue()``
    comes first (no I/O queues any more: with a live path the flush works as before, without
    one it fails at once instead of after ``policy.flush_timeout``), and the detach goes on
    past every failure.  Returns the list of error texts.
    """
    errors, retry = [], False
    device = os.path.realpath(os.path.join(connector.root, path.lstrip("/")))   # md127, dm-3
    if exists(connector, path):
        if force and unqueue is not None:
            unqueue()
        if dead is not None and dead():
            err = "no active path in %s: flush impossible" % path
            if not force:
                raise DetachAborted(what=path, reason=err + "; detach with force to discard "
                                    "what is queued")
            errors.append(err + " (detached without it)")
            err = None
        else:
            err = connector.kernel.flush_device(path, connector.policy.flush_timeout)
        if err:
            if not force:       # the replicas must not go away under unwritten data
                raise DetachAborted(what=path, reason=err)
            errors.append(err)
        result = remove()
        if not result["ok"]:
            if not force:
                raise DetachAborted(what=path, reason=result["error"])
            retry = True            # forced: once more when the legs are gone (nothing left)
    for target in request.targets:
        errors += connector.attacher.detach(target, flush=False, force=force,
                                            key=request.volume_key)
    if retry and (exists(connector, path) or os.path.exists(device)):
        # the legs are gone now, so whatever held the array (a flush stuck on them) lets go
        # within moments; udev may have dropped the link meanwhile, the device stays
        last = {}

        def removed():
            last.update(remove())
            return last["ok"] or not os.path.exists(device)
        if not poll(removed, REMOVE_RETRY, connector.clock):
            errors.append(last["error"])
            LOG.warning("%s is left behind: %s", path, last["error"])
    return errors


def leg_report(results):
    return [{"nqn": t.nqn, "device": att.device if att else None,
             "degraded": att.degraded if att else True,
             "created": list(att.created) if att else [],
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


def rescan_legs(connector, request):
    """Bring every attached replica to its target's size, concurrently (extend).

    A replica that is not attached now, or has no live path, is skipped with a warning: the
    volume is degraded and grows with the replicas it has (the next heal brings the others
    back at the new size).  Returns [(device, old, new)] of the rescanned replicas; raises
    the first replica's error when none could be rescanned.
    """
    def one(target):
        try:
            return connector.rescan_and_wait(target)
        except (VolumePathsNotFound, VolumeDeviceNotFound) as e:
            LOG.warning("Extend of %s: replica %s skipped (%s)", request.describe(),
                        target.describe(), e)
            return e
    results = threads.map_concurrently("extend", one, request.targets)
    legs = [r for r in results if not isinstance(r, NVMeOFError)]
    if not legs:
        raise results[0]
    return legs

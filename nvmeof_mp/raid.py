"""RAID1 over ``volume_replicas``: md joins the replicas' block devices.

``plan`` decides from the legs' superblocks alone: create (internal bitmap, failfast) only
when every leg is present and blank; otherwise assemble, or adopt the array udev's incremental
assembly may already have started, re-add legs of this array that return and add blank ones.
A leg carrying another array's superblock is left out, never overwritten.  One replica
without a superblock of ours is used as it is (no md), as os-brick does.
The array is ``/dev/md/<md_name(alias)>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from oslo_log import log as logging

from nvmeof_mp import mdplan, replicas, threads
from nvmeof_mp.exception import ReplicaError
from nvmeof_mp.locks import named_lock
from nvmeof_mp.plan import find_namespace
from nvmeof_mp.waiting import poll

LOG = logging.getLogger(__name__)


# md's superblock name field is 32 bytes, but mdadm keeps 31 characters of a name in it (seen
# on the real kernel: a 32-character --name comes back cut by one), and an array found by a
# cut name would not be recognised as ours.
MD_NAME_MAX = 31


def md_name(alias):
    """The md array name for a Cinder alias: the alias itself when md keeps it whole (so
    arrays os-brick made under that alias are found again), else its first 22 characters,
    '-' and 8 hex digits of its SHA-256: stable across hosts and releases, 31 bytes."""
    if len(alias.encode()) <= MD_NAME_MAX:
        return alias
    return alias[:MD_NAME_MAX - 9] + "-" + hashlib.sha256(alias.encode()).hexdigest()[:8]


def device_path(request):
    return "/dev/md/" + md_name(request.alias)


def superblock_name(info):
    """The array name of an ``--examine --export`` result, without mdadm's "homehost:"."""
    return (info or {}).get("MD_NAME", "").rsplit(":", 1)[-1]


@dataclasses.dataclass
class Plan:
    """What to do with the legs attached now.

    ``action``: "create" (every leg present and blank), "assemble" (start or adopt the array
    from ``members``, legs carrying its superblock, re-adding those behind), "device" (one
    replica without an md superblock of ours: its own device, as os-brick) or "refuse".
    ``add``: blank legs to ``--add`` to the running array; ``left_out``: (leg, why) never
    touched because they carry another array's superblock.
    """
    action: str
    members: list = dataclasses.field(default_factory=list)
    add: list = dataclasses.field(default_factory=list)
    left_out: list = dataclasses.field(default_factory=list)
    reason: str = ""


def plan(name, replica_count, legs):
    """Decide from the legs' ``md_examine`` results alone; ``legs`` is [(device, examine or
    None)] for the replicas attached now.  No sequence of these decisions overwrites a leg
    holding this volume's data: a leg with a superblock is never created over nor added,
    only assembled or re-added (and only into the array its superblock names)."""
    ours = [(d, e) for d, e in legs if e and superblock_name(e) == name]
    foreign = [(d, "carries the md superblock of another array (%s, %s)" % (
        e.get("MD_NAME"), e.get("MD_UUID"))) for d, e in legs if e and superblock_name(e) != name]
    blank = [d for d, e in legs if not e]
    if replica_count == 1:
        if ours:
            return Plan("assemble", members=[ours[0][0]])
        return Plan("device", members=[legs[0][0]])     # what it holds is the volume
    if ours:
        uuids = sorted({e.get("MD_UUID") for _, e in ours})
        if len(uuids) > 1:
            return Plan("refuse", reason="the legs carry superblocks of different arrays "
                        "named %s (%s): which holds the data is unknown" % (
                            name, ", ".join(str(u) for u in uuids)))
        return Plan("assemble", members=[d for d, _ in ours], add=blank, left_out=foreign)
    if foreign:
        return Plan("refuse", left_out=foreign, reason="no leg carries array %s and %s: "
                    "not created over it" % (name, "; ".join(
                        "%s %s" % f for f in foreign)))
    if len(blank) < replica_count:
        return Plan("refuse", reason="cannot create md %s: %d of %d legs found (the absent "
                    "ones may hold the data)" % (name, len(blank), replica_count))
    return Plan("create", members=blank)


#: how long an assemble is retried while udev's incremental assembly races it
ASSEMBLE_RETRY = 3.0


def assemble(connector, name, legs):
    """``md_assemble`` until it succeeds, is refused, or ``ASSEMBLE_RETRY`` passes.  An
    inactive array of these legs (udev's incremental assembly grabbed some as they appeared)
    is stopped first, so the array comes up from all legs at once (no needless resync)."""
    kernel, last = connector.kernel, {}

    def attempt():
        last.clear()
        last.update(kernel.md_assemble(name, legs))
        if last.get("inactive"):            # stopped, it is assembled again at once
            kernel.md_stop_inactive(name, legs)
            last.clear()
            last.update(kernel.md_assemble(name, legs))
        return last.get("ok") or not (last.get("inactive") or last.get("retry"))
    poll(attempt, ASSEMBLE_RETRY, connector.clock, first=0.1, longest=0.5)
    return dict(last)


def connect(connector, request, pending=None):
    """Attach the legs, then do what ``plan`` decides: create, assemble or adopt the array and
    add blank legs, or return a single replica's own device.

    Any failure undoes what this call made (the legs' new controllers, and the array when it
    did not exist before the call) and is raised.
    """
    name = md_name(request.alias)
    path = "/dev/md/" + name
    existed = replicas.exists(connector, path)
    results = replicas.attach_all(connector, request, pending)
    legs = [att.device for _, att, _ in results if att]
    kernel = connector.kernel
    started, left_out, readded = [], [], []
    try:
        with named_lock("md-" + name, connector.lock_path):
            # one mdadm pair per leg, the legs at once (the daemon runs calls in parallel)
            examined = dict(zip(legs, threads.map_concurrently("md-examine", kernel.md_examine,
                                                               legs), strict=True))
            decided = plan(name, request.replica_count, list(examined.items()))
            left_out += decided.left_out
            if decided.action == "refuse":
                raise ReplicaError(reason="%s: %s" % (request.describe(), decided.reason))
            if decided.action == "device":
                path = decided.members[0]
            elif decided.action == "create":
                started.append("create")
                replicas.require_ok(kernel.md_create(name, decided.members,
                                                     request.replica_count), "mdadm --create")
            else:
                started.append("assemble")
                legs_of = {d: examined[d] for d in decided.members}
                start = list(legs_of) if existed else mdplan.assemble_from(legs_of)
                result = replicas.require_ok(assemble(connector, name, start),
                                             "mdadm --assemble")
                held = result.get("members") or []
                re_add, refused = [], []
                if any(d not in held for d in legs_of):     # only then the views matter
                    running = dict(zip(held, threads.map_concurrently(
                        "md-examine", kernel.md_examine, held), strict=True))
                    re_add, refused = mdplan.returning_legs(held, running, legs_of)
                left_out += refused
                for leg in re_add:
                    done = kernel.md_re_add(name, leg)
                    if done.get("ok"):
                        readded.append(leg)
                    else:
                        left_out.append((leg, done.get("error")))
                for leg in decided.add:
                    added = kernel.md_add(name, leg)
                    if not added.get("ok"):
                        left_out.append((leg, added.get("error")))
        if path.startswith("/dev/md/"):
            connector.wait_udev(path)
    except Exception:
        stop = None
        if not existed and (started or replicas.exists(connector, "/dev/md/" + name)):
            stop = lambda: kernel.md_stop(name)      # noqa: E731
        replicas.undo(connector, results, "RAID attach of %s failed" % request.alias, stop)
        raise
    for leg, why in left_out:
        LOG.warning("%s: leg %s left out of the array, not overwritten: %s",
                    request.describe(), leg, why)
    report = replicas.leg_report(results)
    for entry in report:
        why = next((w for leg, w in left_out if leg == entry["device"]), None)
        if why:
            entry.update(degraded=True, error="left out: %s" % why)
    degraded = len(legs) - len(left_out) < request.replica_count or any(
        att is None or att.degraded for _, att, _ in results)
    (LOG.warning if degraded else LOG.info)(
        "Attached %s at %s%s", request.describe(), path, " (DEGRADED)" if degraded else "")
    if readded and existed:
        LOG.info("%s: legs re-added to the running array: %s", request.describe(),
                 ", ".join(readded))
    return {"type": "block", "path": path, "degraded": degraded, "replicas": report,
            "readded": readded if existed else []}


def _plain(connector, request):
    """A single replica attached without md (see ``plan``: "device")."""
    return request.replica_count == 1 and not replicas.exists(connector, device_path(request))


def volume_paths(connector, request):
    path = device_path(request)
    if replicas.exists(connector, path):
        return [path]
    if request.replica_count == 1:
        ns = find_namespace(request.target, connector.sysfs.snapshot([request.target.nqn]))
        return [ns.device] if ns else []
    return []


def disconnect(connector, request, force=False):
    """Flush and stop the array (a degraded one too), then disconnect every leg.  The stop
    waits (bounded) for udev's pending events, see ``replicas.udev_idle``.  A single replica
    without md is detached as a single volume."""
    if _plain(connector, request):
        return connector.attacher.detach(request.target, force=force, key=request.volume_key)
    name = md_name(request.alias)
    # the md node, learned while /dev/md/<name> exists: udev may drop the link of an array
    # whose legs all died, and a forced detach must still stop it
    link = os.path.join(connector.root, device_path(request).lstrip("/"))
    node = "/dev/" + os.path.basename(os.path.realpath(link)) if os.path.exists(link) else None

    def stop():
        replicas.udev_idle(connector)
        return connector.kernel.md_stop(name, node)
    return replicas.teardown(connector, request, device_path(request), stop, force)


def extend(connector, request):
    if _plain(connector, request):
        device, old, new = connector.rescan_and_wait(request.target)
        LOG.info("Extended %s: %d -> %d bytes", device, old, new)
        return new
    old = int(replicas.block_attr(connector, device_path(request), "size") or 0) * 512
    replicas.rescan_legs(connector, request)      # the attached legs: degraded grows too
    replicas.require_ok(connector.kernel.md_grow(md_name(request.alias)), "mdadm --grow")
    new = int(replicas.block_attr(connector, device_path(request), "size") or 0) * 512
    LOG.info("Extended %s: %d -> %d bytes", device_path(request), old, new)
    return new

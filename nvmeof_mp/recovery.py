"""Finishing what a crashed process left half done, from the attachment registry.

A record left ``attaching`` by a process that died was never handed to anyone: the attach is
rolled back (detached with force: nothing was written through it).  A record left
``detaching`` belonged to a volume its user was giving up: the detach is finished, flush
first, and stays pending (the record says why) when the flush cannot be done.  Both happen
under the volume's lock, taken without waiting when another call is the one that found the
record (someone holding the lock is working on that volume now).
"""

from __future__ import annotations

from oslo_log import log as logging

from nvmeof_mp import connection
from nvmeof_mp import registry as reg
from nvmeof_mp.exception import DetachAborted, NVMeOFError
from nvmeof_mp.locks import lock_busy_error, volume_lock

LOG = logging.getLogger(__name__)


def neighbours(connector, request):
    """Recover the interrupted records of other volumes that hold one of ``request``'s
    subsystems, before this call plans anything on those subsystems."""
    registry = connector.registry
    for target in request.targets:
        host_nqn, _ = connector.attacher.identity(target)
        for ref in registry.users(target.nqn, host_nqn, but=request.volume_key):
            record = registry.get(ref.get("key"))
            if record is None and not reg.alive(ref.get("owner") or {}):
                LOG.info("Dropping the registry reference of %s to %s: no record, and the "
                         "process that made it is gone", ref.get("key"), target.nqn)
                registry.drop(ref["key"])
            elif registry.interrupted(record):
                recover(connector, record, wait=False)


def recover(connector, record, wait=True):
    """Roll back an interrupted attach or finish an interrupted detach.  Returns what was
    done, for the log and ``heal --all``."""
    key = record["key"]
    try:
        with volume_lock(key, connector.lock_path_of(record), blocking=wait):
            return _recover(connector, key)
    except lock_busy_error():
        return "busy: another call is working on it"


def recover_locked(connector, key):
    """``recover`` for a caller that holds the volume's lock already."""
    return _recover(connector, key)


def _recover(connector, key):
    registry = connector.registry
    record = registry.get(key)
    if not registry.interrupted(record):
        return "nothing to do"
    pid = (record.get("owner") or {}).get("pid")
    try:
        request = connection.parse(record["connection_info"])
    except (NVMeOFError, KeyError) as e:
        LOG.error("Interrupted %s of %s cannot be recovered: its connection information does "
                  "not parse (%s); forgetting it", record.get("state"), key, e)
        registry.drop(key)
        return "forgotten: %s" % e
    if record["state"] == reg.ATTACHING:
        LOG.warning("Rolling back the attach of %s that process %s left unfinished",
                    request.describe(), pid)
        errors = connector.detach_request(request, force=True)
        registry.drop(key)
        for err in errors:
            LOG.warning("Rolling back %s: %s", request.describe(), err)
        return "attach rolled back" + (" (%s)" % "; ".join(errors) if errors else "")
    LOG.warning("Finishing the detach of %s that process %s left unfinished",
                request.describe(), pid)
    try:
        errors = connector.detach_request(request, force=False)
    except DetachAborted as e:
        registry.event(key, "interrupted detach cannot finish: %s" % e)
        return "detach pending: %s" % e
    registry.drop(key)
    return "detach finished" + (" (%s)" % "; ".join(errors) if errors else "")

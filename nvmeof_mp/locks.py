"""Fine-grained cross-process locks.

There is no host-wide lock around attaches: what must be exclusive is the set of controllers of
one subsystem for one host NQN (deciding which to connect, reuse or delete), and everything
done to one volume (attach, heal, extend, detach).  Volumes of different subsystems attach in
parallel, across threads and processes.

A lock is oslo.concurrency's external lock on one file per key, which meets the four needs of a
connector that Nova and Cinder load:

* exclusive across processes and threads: an in-process semaphore per name, then a POSIX
  record lock (``lockf``) on the file;
* green-aware: under ``eventlet.monkey_patch()`` the semaphore is green, and the file lock is
  taken without blocking, retried after (green) sleeps of 10 to 100 ms, so a waiter never
  stops the hub while the holder waits on it;
* fork-safe: POSIX record locks are not inherited by a child, so the privsep daemon forked
  (without exec) by the first privileged call, inside a lock, does not keep it held;
* cheap: ~0.03 ms of CPU per lock; only a waiter in another process pays the retry sleeps.

A bare ``flock`` fails the second and third (it blocks the hub and belongs to the open file
description, which a fork shares).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile

from nvmeof_mp.exception import LockDirectoryError


def default_lock_path():
    """``$NVMEOF_MP_LOCK_PATH``; else the deployment's ``[oslo_concurrency] lock_path`` (Nova's
    and Cinder's lock directory, also taken from ``$OSLO_LOCK_PATH``); else a per-user
    directory under the temp dir, used only while this user owns it (see ``_check_dir``)."""
    return (os.environ.get("NVMEOF_MP_LOCK_PATH") or _oslo_lock_path()
            or os.path.join(tempfile.gettempdir(), "nvmeof_mp-locks-%d" % os.getuid()))


def _oslo_lock_path():
    """The service's ``[oslo_concurrency] lock_path``: a service that has the option has
    registered it already (reading it does not import oslo.concurrency)."""
    from oslo_config import cfg
    try:
        return cfg.CONF.oslo_concurrency.lock_path
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return os.environ.get("OSLO_LOCK_PATH")


def _name(kind, key):
    return "nvmeof_mp-%s-%s" % (kind, hashlib.sha256(key.encode()).hexdigest()[:20])


def lock_file(kind, key, lock_path=None):
    """The file whose record lock is the lock of (kind, key)."""
    return os.path.join(lock_path or default_lock_path(), _name(kind, key))


def _check_dir(directory):
    """Make the lock directory (mode 0700) when missing - also again when a temp cleaner
    removed it while the service ran - and refuse one another user could tamper with: whoever
    owns it could hold or remove our locks (fail closed rather than share it)."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise LockDirectoryError(path=directory, reason="not a directory")
    if st.st_uid not in (os.getuid(), 0) and directory not in _services:
        raise LockDirectoryError(path=directory, reason="owned by uid %d" % st.st_uid)
    if st.st_mode & 0o022:
        raise LockDirectoryError(path=directory, reason="writable by others")
    return st


_services = set()


def service_directory(path):
    """``path`` when root may lock in it as a service's own lock directory, else None: the
    heal timer takes a volume's lock where the service that attached it (nova-compute,
    cinder-volume) takes it.  Only a directory a service user owns and nobody else may write,
    never a system directory (root would make lock files in it); files root makes there
    belong to the directory's owner."""
    if os.getuid() != 0 or not os.path.isabs(path):
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0 or st.st_mode & 0o022:
        return None
    _services.add(path)
    return path


def _lock(kind, key, lock_path, blocking=True):
    from oslo_concurrency import lockutils
    directory = lock_path or default_lock_path()
    st = _check_dir(directory)
    path = lock_file(kind, key, directory)
    name = os.path.basename(path)
    if not os.path.exists(path):        # private file (the lock itself opens it for append)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if st.st_uid != os.getuid():    # root in a service's directory: the service's file
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
    return lockutils.lock(name, external=True, lock_path=directory, do_log=False,
                          blocking=blocking)


def subsystem_lock(nqn, host_nqn, lock_path=None):
    """Held while deciding and changing the controllers of (subsystem NQN, host NQN)."""
    return _lock("subsys", "%s|%s" % (nqn, host_nqn or ""), lock_path)


def named_lock(name, lock_path=None):
    """Held while creating or removing a named object of ours (an md alias, a dm map)."""
    return _lock("obj", name, lock_path)


def volume_lock(key, lock_path=None, blocking=True):
    """Held for the whole of one volume's attach, heal, extend or detach, so a heal from a
    timer cannot re-assemble or re-attach a volume half way through its detach.  Taken
    before any subsystem or named lock, never inside one.  ``blocking=False``: entering
    raises ``LockBusy`` at once when another thread or process holds it."""
    return _lock("vol", key, lock_path, blocking)


def lock_busy_error():
    """The exception a non-blocking lock raises when it is held elsewhere."""
    from oslo_concurrency import lockutils
    return lockutils.AcquireLockFailedException

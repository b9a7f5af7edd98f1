"""Fine-grained cross-process locks.

There is no host-wide lock around attaches: what must be exclusive is the set of controllers of
one subsystem for one host NQN (deciding which to connect, reuse or delete).  Volumes of
different subsystems attach in parallel, across threads and processes.

A lock is ``flock`` on one file per key.  A waiter sleeps in the kernel and runs the moment
the holder lets go; oslo.concurrency's external locks instead retry with sleeps of 10 to 100 ms,
which two processes attaching volumes of one subsystem would pay at every hand-over (and which
cost ~2 ms of CPU per lock under emulation, against 0.1 ms here).  ``flock`` belongs to the open
file, so two threads of one process exclude each other as two processes do.  Closing the file
(also when the process dies) releases the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile

def default_lock_path():
    """``$NVMEOF_MP_LOCK_PATH``; else the deployment's ``[oslo_concurrency] lock_path`` (Nova's
    and Cinder's lock directory, also taken from ``$OSLO_LOCK_PATH``); else a per-user
    directory under the temp dir."""
    return (os.environ.get("NVMEOF_MP_LOCK_PATH") or _oslo_lock_path()
            or os.path.join(tempfile.gettempdir(), "nvmeof_mp-locks-%d" % os.getuid()))


def _oslo_lock_path():
    """The service's ``[oslo_concurrency] lock_path``, without importing oslo.concurrency
    (~0.5 s under emulation): a service that has the option has registered it already."""
    from oslo_config import cfg
    try:
        return cfg.CONF.oslo_concurrency.lock_path
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return os.environ.get("OSLO_LOCK_PATH")


def lock_file(kind, key, lock_path=None):
    """The file whose ``flock`` is the lock of (kind, key)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    directory = lock_path or default_lock_path()
    return os.path.join(directory, "nvmeof_mp-%s-%s" % (kind, digest))


def _open(path):
    """Open (create) a lock file; its directory is made on first need, and again if a temp
    cleaner removed it while the service ran."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, flags, 0o600)


@contextlib.contextmanager
def _lock(kind, key, lock_path):
    fd = _open(lock_file(kind, key, lock_path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def subsystem_lock(nqn, host_nqn, lock_path=None):
    """Held while deciding and changing the controllers of (subsystem NQN, host NQN)."""
    return _lock("subsys", "%s|%s" % (nqn, host_nqn or ""), lock_path)


def named_lock(name, lock_path=None):
    """Held while creating or removing a named object of ours (an md alias, a dm map)."""
    return _lock("obj", name, lock_path)

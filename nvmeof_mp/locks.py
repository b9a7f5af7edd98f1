"""Fine-grained cross-process locks.

There is no host-wide lock around attaches: what must be exclusive is the set of controllers of
one subsystem for one host NQN (deciding which to connect, reuse or delete).  Volumes of
different subsystems attach in parallel, across threads and processes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from oslo_concurrency import lockutils


def default_lock_path():
    return os.environ.get("NVMEOF_MP_LOCK_PATH") or os.path.join(
        tempfile.gettempdir(), "nvmeof_mp-locks-%d" % os.getuid())


def _lock(kind, key, lock_path):
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    path = lock_path or default_lock_path()
    os.makedirs(path, mode=0o700, exist_ok=True)
    return lockutils.lock("%s-%s" % (kind, digest), lock_file_prefix="nvmeof_mp-",
                          external=True, lock_path=path)


def subsystem_lock(nqn, host_nqn, lock_path=None):
    """Held while deciding and changing the controllers of (subsystem NQN, host NQN)."""
    return _lock("subsys", "%s|%s" % (nqn, host_nqn or ""), lock_path)


def named_lock(name, lock_path=None):
    """Held while creating or removing a named object of ours (an md alias, a dm map)."""
    return _lock("obj", name, lock_path)

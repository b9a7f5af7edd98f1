"""The attachment registry's files, written only here (root); every process may read them.

Layout under ``<root>/var/lib/nvmeof_mp`` (root-owned, 0755)::

    boot_id               the boot the records belong to (they never outlive it)
    volumes/<v>.json      one record per volume attached on this host (0644, no secrets)
    secrets/<v>.json      the connection information with its DH-HMAC-CHAP secrets (0600,
                          directory 0700): only root can heal an authenticated volume
    refs/<s>/<v>.json     volume <v> uses subsystem <s> (a subsystem NQN for one host NQN)

``<v>`` and ``<s>`` are SHA-256 prefixes of the volume key and of ``nqn|host_nqn``, made here:
no caller names a file.  Each file is replaced atomically (a new file, then rename); a crash
of any process leaves either the old or the new content.  Holding and releasing a subsystem
happen under that subsystem's lock (a thread lock, then ``lockf`` on ``locks/<s>``), shared by
the privsep daemons of every service on the host (nova-compute and cinder-volume each have
their own daemon): the deletes of one subsystem's controllers wait for nobody else's.  Other
changes take ``lock``.

The plain functions take ``root`` (the simulated host of the tests passes its tree); the
entrypoints use the host's ``/`` and validate their arguments again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading

from nvmeof_mp import connection
from nvmeof_mp import privileged
from nvmeof_mp.exception import InvalidConnectionInfo, PrivilegedArgumentError
from nvmeof_mp.names import STATE_DIR

STATES = ("attaching", "attached", "detaching")
RECORD_MAX = 256 * 1024          # bytes of JSON: a record is a few KiB even with 16 replicas
KEY_MAX = 1024
BOOT_ID = "proc/sys/kernel/random/boot_id"

_thread_locks = {}
_thread_locks_lock = threading.Lock()


def state_dir(root="/"):
    return os.path.join(root, STATE_DIR)


def key_name(key):
    """File name of a volume key (validated: a short printable string)."""
    if not isinstance(key, str) or not 0 < len(key) <= KEY_MAX or any(
            ord(c) < 32 or ord(c) == 127 for c in key):
        raise PrivilegedArgumentError("not a volume key: %r" % (key[:80] if isinstance(
            key, str) else key,))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def subsystem_name(nqn, host_nqn):
    for value, what in ((nqn, "nqn"), (host_nqn, "host_nqn")):
        try:
            connection.validate_nqn(value, what)
        except InvalidConnectionInfo as e:
            raise PrivilegedArgumentError(str(e)) from None
    return hashlib.sha256(("%s|%s" % (nqn, host_nqn)).encode()).hexdigest()[:32]


@contextlib.contextmanager
def locked(root="/", subsystem=None):
    """The registry's lock, or with ``subsystem`` (a ``subsystem_name``) that subsystem's."""
    base = state_dir(root)
    _make_dir(base, 0o755)
    path = os.path.join(base, "lock")
    if subsystem is not None:
        _make_dir(os.path.join(base, "locks"), 0o700)
        path = os.path.join(base, "locks", subsystem)
    with _thread_locks_lock:
        thread_lock = _thread_locks.setdefault(path, threading.Lock())
    with thread_lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            if not os.path.exists(os.path.join(base, "boot_id")):
                _stamp(base, current_boot_id(root))     # the boot these records belong to
            yield base
        finally:
            os.close(fd)         # releases the record lock


def _make_dir(path, mode):
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        pass
    os.chmod(path, mode)


def _write(path, data, mode):
    """Replace ``path`` atomically with ``data`` (JSON) and permissions ``mode``."""
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, json.dumps(data, sort_keys=True).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _json_dict(value, what):
    if not isinstance(value, dict):
        raise PrivilegedArgumentError("%s must be a dict" % what)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as e:
        raise PrivilegedArgumentError("%s is not JSON: %s" % (what, e)) from None
    if len(text) > RECORD_MAX:
        raise PrivilegedArgumentError("%s is larger than %d bytes" % (what, RECORD_MAX))
    return value


def _check_record(key, record):
    _json_dict(record, "record")
    if record.get("key") != key:
        raise PrivilegedArgumentError("record of another volume key")
    if record.get("state") not in STATES:
        raise PrivilegedArgumentError("record state must be one of %s" % (STATES,))
    if _has_secret(record):
        raise PrivilegedArgumentError("a record must not hold a secret (secrets go apart)")
    return record


def _has_secret(value):
    if isinstance(value, dict):
        return any((k in connection.SECRET_KEYS and v) or _has_secret(v)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(_has_secret(v) for v in value)
    return False


def _put(base, key, record, secret_info):
    name = key_name(key)
    _make_dir(os.path.join(base, "volumes"), 0o755)
    _write(os.path.join(base, "volumes", name + ".json"), _check_record(key, record), 0o644)
    secret_path = os.path.join(base, "secrets", name + ".json")
    if not record.get("secrets"):
        _remove(secret_path)
    elif secret_info:       # else the secrets written before stay
        _make_dir(os.path.join(base, "secrets"), 0o700)
        _write(secret_path, _json_dict(secret_info, "secret_info"), 0o600)


def put(root, key, record, secret_info=None):
    """Write the record of volume ``key``; its secrets apart when ``record['secrets']`` (None
    keeps those written before), else none."""
    key_name(key)
    with locked(root) as base:
        _put(base, key, record, secret_info)


def hold(root, key, nqn, host_nqn, adopted, owner, record=None, secret_info=None):
    """Volume ``key`` uses subsystem (nqn, host_nqn): its controllers stay while it does.
    ``record`` (optional) is written in the same step."""
    vname, sname = key_name(key), subsystem_name(nqn, host_nqn)
    ref = {"key": key, "nqn": nqn, "host_nqn": host_nqn, "adopted": bool(adopted),
           "owner": _json_dict(owner or {}, "owner")}
    with locked(root, sname) as base:
        refs = os.path.join(base, "refs")
        _make_dir(refs, 0o755)
        _make_dir(os.path.join(refs, sname), 0o755)
        _write(os.path.join(refs, sname, vname + ".json"), ref, 0o644)
        if record is not None:
            _put(base, key, record, secret_info)


def users(base, nqn, host_nqn, but=None):
    """The references of volumes other than ``but`` that hold (nqn, host_nqn) (the daemon
    and every reading process use this one)."""
    directory = os.path.join(base, "refs", subsystem_name(nqn, host_nqn))
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    refs = (_read(os.path.join(directory, n)) for n in names if n.endswith(".json"))
    return [r for r in refs if r and r.get("key") != but]


def release(root, key, nqn, host_nqn, controllers, devices, delete, busy, drop=False):
    """Volume ``key`` no longer uses (nqn, host_nqn): delete ``controllers`` unless another
    volume of this host holds the subsystem or one of ``devices`` (its other namespaces) is
    in use here, then drop the reference (and with ``drop`` the whole record).

    The last check and the delete happen under the registry lock, so a volume of another
    process that holds the subsystem first keeps its controllers.  ``delete(name)`` -> error
    text or None; ``busy(devices)`` -> {device: reason}.
    Returns {'deleted': [...], 'kept': reason or None, 'errors': [...]}.
    """
    vname, sname = key_name(key), subsystem_name(nqn, host_nqn)
    out = {"deleted": [], "kept": None, "errors": []}
    with locked(root, sname) as base:
        others = users(base, nqn, host_nqn, but=key)
        in_use = busy(list(devices)) if devices and controllers and not others else {}
        if others:
            out["kept"] = "used by %d other volume(s) of this host" % len(others)
        elif in_use:
            out["kept"] = "in use on this host: " + ", ".join(
                "%s (%s)" % item for item in sorted(in_use.items()))
        else:
            for name in controllers:
                err = delete(name)
                if err:
                    out["errors"].append(err)
                else:
                    out["deleted"].append(name)
        _remove(os.path.join(base, "refs", sname, vname + ".json"))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(base, "refs", sname))
        if drop:
            _drop(base, key)
    return out


def _drop(base, key):
    name = key_name(key)
    _remove(os.path.join(base, "volumes", name + ".json"))
    _remove(os.path.join(base, "secrets", name + ".json"))
    refs = os.path.join(base, "refs")
    for sub in _listdir(refs):
        _remove(os.path.join(refs, sub, name + ".json"))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(refs, sub))


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def drop(root, key):
    """Forget volume ``key``: its record, its secrets and every reference it holds."""
    key_name(key)
    with locked(root) as base:
        _drop(base, key)


def _stamp(base, boot_id):
    """Write ``boot_id`` (two writers under different locks write the same value)."""
    path = os.path.join(base, "boot_id")
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, (boot_id.strip() + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def reconcile(root, boot_id):
    """Records of another boot describe nothing that exists: remove them.  Returns True when
    it did.  (Every change stamps the registry with the boot it happens in.)"""
    if not isinstance(boot_id, str) or not boot_id.strip():
        return False
    with locked(root) as base:
        with open(os.path.join(base, "boot_id")) as f:
            seen = f.read().strip()
        if seen == boot_id.strip():
            return False
        for sub in ("volumes", "secrets", "refs"):
            shutil.rmtree(os.path.join(base, sub), ignore_errors=True)
        _stamp(base, boot_id)
        return True


def current_boot_id(root="/"):
    try:
        with open(os.path.join(root, BOOT_ID)) as f:
            return f.read().strip()
    except OSError:
        return ""


# -- entrypoints (the host's own registry) ----------------------------------------------------

@privileged.default.entrypoint
def registry_put(key, record, secret_info=None):
    put("/", key, record, secret_info)


@privileged.default.entrypoint
def registry_hold(key, nqn, host_nqn, adopted, owner, record=None, secret_info=None):
    hold("/", key, nqn, host_nqn, adopted, owner, record, secret_info)


HOLD_KEYS = ("key", "nqn", "host_nqn", "adopted", "owner", "record", "secret_info")


def hold_checked(args):
    """``registry_hold`` given as a dict (with a connect call)."""
    if not isinstance(args, dict) or set(args) - set(HOLD_KEYS) or not {
            "key", "nqn", "host_nqn"} <= set(args):
        raise PrivilegedArgumentError("a hold is a dict of %s" % ", ".join(HOLD_KEYS))
    hold("/", **args)


@privileged.default.entrypoint
def registry_release(key, nqn, host_nqn, controllers, devices, drop=False):
    from nvmeof_mp.privileged import host, nvme
    if not isinstance(controllers, (list, tuple)) or not isinstance(devices, (list, tuple)):
        raise PrivilegedArgumentError("controllers and devices must be lists")
    names = [nvme.subsystem_controller(c, nqn, host_nqn) for c in controllers]
    devs = [host.fabrics_namespace(d) for d in devices]
    return release("/", key, nqn, host_nqn, names, devs, nvme.delete,
                   lambda found: host.busy_devices(found, host.EXCLUSIVE_TIMEOUT), drop)


@privileged.default.entrypoint
def registry_drop(key):
    drop("/", key)


@privileged.default.entrypoint
def registry_reconcile():
    return reconcile("/", current_boot_id("/"))

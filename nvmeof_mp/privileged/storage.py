"""Privileged md (mdadm) entrypoints; dm-multipath's are in ``dmsetup``.

Arguments are structured and validated: an md alias is a safe name, devices are our own kinds
of block devices.  Results are ``{'ok': bool, 'out': str, 'error': str}``.
"""

from __future__ import annotations

import os
import re

from nvmeof_mp import names, privileged, threads
from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import host
from nvmeof_mp.privileged import tools

_ALIAS_RE = re.compile("^%s$" % names.MD_NAME)


def alias(value):
    if not isinstance(value, str) or not _ALIAS_RE.fullmatch(value):
        raise PrivilegedArgumentError("not a safe md alias: %r" % (value,))
    return value


def nvme_devices(devices):
    """md legs: NVMe-oF namespaces only (never a local PCIe disk), see
    ``host.fabrics_namespace``."""
    if not isinstance(devices, (list, tuple)) or not devices:
        raise PrivilegedArgumentError("md legs must be a non-empty list")
    return [host.fabrics_namespace(d) for d in devices]


# Arrays this library creates carry this array-UUID prefix ("nvmeofmp" in hex), set with
# ``mdadm --create --uuid``; stop, grow, assemble and add act only on arrays that carry it, or
# on arrays made before it existed whose superblock name is exactly the requested name (see
# ``ownership``).  Every member must be an NVMe-oF namespace either way.
MD_UUID_PREFIX = "6e766d65:6f666d70:"
_SWAPPED_PREFIX = "".join(bytes.fromhex(w)[::-1].hex() + ":"
                          for w in MD_UUID_PREFIX.split(":")[:2])
SYS_BLOCK = "/sys/block"
DEV = "/dev"


def new_md_uuid():
    rand = os.urandom(8).hex()
    return MD_UUID_PREFIX + rand[:8] + ":" + rand[8:]


def _export(text):
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def ownership(info, name, by_link=False):
    """"marked" (made by this library), "legacy" (made before the marker: a RAID1 whose
    superblock name is exactly ``name``, as os-brick and older releases named it) or None.

    ``by_link``: the array was found through its /dev/md/<name> link, which udev made from
    the array's name.  When every leg has died mdadm reads no superblock and shows no name
    (Linux 6.12); a marked array found so is still ours."""
    if not info:
        return None
    if "MD_NAME" not in info and by_link:
        # no superblock read: mdadm shows the kernel's copy of the UUID, each 32-bit word
        # byte-swapped on x86 ("656d766e:706d666f:..." for our prefix)
        uuid = info.get("MD_UUID", "").lower()
        marked = uuid.startswith(MD_UUID_PREFIX) or uuid.startswith(_SWAPPED_PREFIX)
        return "marked" if marked and info.get("MD_LEVEL", "raid1") == "raid1" else None
    if info.get("MD_NAME", "").rsplit(":", 1)[-1] != name:
        return None
    if info.get("MD_LEVEL", "raid1") != "raid1":
        return None
    return "marked" if info.get("MD_UUID", "").lower().startswith(MD_UUID_PREFIX) else "legacy"


def _detail(array):
    result = _run(["mdadm", "--detail", "--export", array])
    return _export(result["out"]) if result["ok"] else None


def not_ours(array, name):
    """Why the running ``array`` must not be touched under ``name``, or None when it is ours:
    marked or legacy (``ownership``) and every member an NVMe-oF namespace."""
    info = _detail(array)
    if info is None:
        return "cannot read the md superblock of %s" % array
    by_link = array == "/dev/md/" + name and os.path.exists(os.path.join(DEV, "md", name))
    if ownership(info, name, by_link) is None:
        return "%s is not an array this library made for %s (name %s, uuid %s)" % (
            array, name, info.get("MD_NAME"), info.get("MD_UUID"))
    for key, value in sorted(info.items()):
        if key.startswith("MD_DEVICE_") and key.endswith("_DEV"):
            if _gone_namespace(value):
                continue        # a dead leg md still lists: its controller is deleted
            try:
                host.fabrics_namespace(value)
            except PrivilegedArgumentError as e:
                return "%s has a member that is not ours: %s" % (array, e)
    return None


def _gone_namespace(device):
    name = os.path.basename(device)
    return (re.fullmatch(names.NAMESPACE, name) is not None
            and not os.path.lexists(os.path.join(host.SYS, "class/block", name)))


def _refused(error):
    return {"ok": False, "out": "", "error": error}


def _run(argv, timeout=120):
    ran = tools.run(argv, timeout=timeout)
    if ran.missing:
        return {"ok": False, "out": "", "error": "%s is not installed" % argv[0]}
    if ran.timed_out:
        return {"ok": False, "out": "", "error": tools.describe_timeout(argv, ran, timeout)}
    return {"ok": ran.ok, "out": ran.stdout,
            "error": "" if ran.ok else (ran.stderr or ran.stdout).strip()}


def mdadm_create_argv(name, devices, uuid):
    """Every leg present (no ``missing`` slot: an absent leg may hold the data) and blank,
    so ``--assume-clean`` is true: the legs hold nothing yet."""
    argv = ["mdadm", "--create", "/dev/md/" + name, "--run", "--name=" + name,
            "--uuid=" + uuid, "--level=raid1", "--raid-devices=%d" % len(devices),
            "--metadata=1.2", "--bitmap=internal", "--homehost=any", "--failfast",
            "--assume-clean"]
    if len(devices) == 1:
        argv.append("--force")          # mdadm refuses a one-disk RAID1 without it
    return argv + list(devices)


@privileged.default.entrypoint
def md_create(name, devices, raid_devices):
    """Create /dev/md/<name> over every leg; refused unless each is blank (no md superblock:
    a leg holding an array's data is never created over)."""
    name, devices = alias(name), nvme_devices(devices)
    if not isinstance(raid_devices, int) or raid_devices != len(devices) or raid_devices > 32:
        raise PrivilegedArgumentError("md create needs every leg: raid_devices must be the "
                                      "number of legs (at most 32)")
    if len(set(devices)) != len(devices):
        raise PrivilegedArgumentError("a leg is given twice")
    marked = [d for d in devices if _examine(d)]
    if marked:
        return _refused("%s carr%s an md superblock: not created over" % (
            ", ".join(marked), "ies" if len(marked) == 1 else "y"))
    return _run(mdadm_create_argv(name, devices, new_md_uuid()))


def _holder_md(device):
    """The md array (``/dev/mdN``) that holds a leg, if any (udev's incremental assembly)."""
    holders = os.path.join(host.SYS, "class/block", os.path.basename(device), "holders")
    try:
        return next(("/dev/" + h for h in os.listdir(holders) if h.startswith("md")), None)
    except OSError:
        return None


def _find_array(md, devices):
    """The array for /dev/md/<name>: its link, mdadm's map (the link may not exist yet while
    udev works), or the md device holding one of the legs."""
    if os.path.exists(os.path.join(DEV, md[len("/dev/"):])):
        return md
    try:
        with open("/run/mdadm/map") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[3] == md:
                    return "/dev/" + fields[0]
    except OSError:
        pass
    return next((h for h in map(_holder_md, devices) if h), None)


def _array_state(array):
    try:
        name = os.path.basename(os.path.realpath(os.path.join(DEV, array[len("/dev/"):])))
        with open(os.path.join(host.SYS, "block", name, "md/array_state")) as f:
            return f.read().strip()
    except OSError:
        return None


def _has_faulty_member(array):
    """Does the array list a member md marked faulty (``md/dev-*/state``)?  Then
    ``--remove failed`` has something to do; an mdadm run less in the common case."""
    md = os.path.join(host.SYS, "block", os.path.basename(_md_node(array) or ""), "md")
    try:
        members = [d for d in os.listdir(md) if d.startswith("dev-")]
    except OSError:
        return True         # cannot tell: let mdadm look
    for member in members:
        try:
            with open(os.path.join(md, member, "state")) as f:
                if "faulty" in f.read().split(","):
                    return True
        except OSError:
            continue        # removed while we looked
    return False


def _legs_uuid(name, devices):
    """The array UUID every leg's superblock carries (``ownership``: marked, or legacy under
    exactly this name), or a refusal."""
    infos = dict(zip(devices, threads.map_concurrently("md-tools", _examine, devices),
                     strict=True))
    strange = [d for d, info in infos.items() if ownership(info, name) is None]
    if strange:
        return None, _refused("%s: no superblock of array %s: not assembled" % (
            ", ".join(strange), name))
    uuids = {info.get("MD_UUID", "").lower() for info in infos.values()}
    if len(uuids) != 1:
        return None, _refused("the legs belong to different arrays named %s" % name)
    return uuids.pop(), None


@privileged.default.entrypoint
def md_assemble(name, devices):
    """One attempt to bring up /dev/md/<name> from legs that carry its superblock, or to
    adopt it running.  Every leg must carry the superblock of this one array; a blank leg is
    added with ``md_add``, a returning one re-added with ``md_re_add``, never here.

    udev's ``mdadm --incremental`` may race us: an array of these legs left inactive (it
    grabbed legs as they appeared) is answered ``inactive`` (the caller stops it with
    ``md_stop_inactive`` and tries again), a failed assemble ``retry``; the caller retries
    under its deadline.  A running array must be ours and of these legs' UUID.  ``members``:
    the given legs the running array holds.
    """
    md, devices = "/dev/md/" + alias(name), nvme_devices(devices)
    uuid, refused = _legs_uuid(name, devices)
    if refused:
        return refused
    array = _find_array(md, devices)
    if array and _array_state(array) == "inactive":
        found = (_detail(array) or {}).get("MD_UUID", uuid).lower()
        if found != uuid:
            return _refused("%s (uuid %s) is not the array of these legs" % (array, found))
        return dict(_refused("%s is inactive: udev's incremental assembly holds legs of it"
                             % array), inactive=True)
    if array:
        why = not_ours(array, name)
        if why is None and (_detail(array) or {}).get("MD_UUID", "").lower() != uuid:
            why = "%s is not the array of these legs (uuid %s)" % (array, uuid)
        if why:
            return _refused(why)
    else:
        result = _run(["mdadm", "--assemble", "--run", md, "--uuid=" + uuid] + devices)
        if not result["ok"]:
            return dict(result, retry=True)
        array = md
    if _has_faulty_member(array):       # a dead leg the running array still lists
        _run(["mdadm", "--manage", array, "--remove", "failed"])
    active = _array_state(array) not in (None, "inactive")
    return {"ok": active, "out": "", "members": [d for d in devices if _holder_md(d)],
            "error": "" if active else "array %s is not active" % array}


@privileged.default.entrypoint
def md_stop_inactive(name, devices):
    """Stop the inactive array holding these legs (udev's incremental assembly started it),
    only when it is inactive and of the UUID the legs' superblocks carry."""
    md, devices = "/dev/md/" + alias(name), nvme_devices(devices)
    uuid, refused = _legs_uuid(name, devices)
    if refused:
        return refused
    array = _find_array(md, devices)
    if array is None or _array_state(array) != "inactive":
        return _refused("no inactive array of %s" % md)
    found = (_detail(array) or {}).get("MD_UUID", "").lower()
    if found != uuid:
        return _refused("%s (uuid %s) is not the array of these legs" % (array, found))
    return _run(["mdadm", "--stop", array])


@privileged.default.entrypoint
def md_re_add(name, device):
    """``--re-add`` one leg carrying this array's superblock (same UUID as the running
    /dev/md/<name>, which must be ours) and not in it.  Whether it should join (split
    history) is the caller's decision (``nvmeof_mp.mdplan``), made from ``md_examine``."""
    md, device = "/dev/md/" + alias(name), nvme_devices([device])[0]
    array = _find_array(md, [])
    if array is None:
        return _refused("%s is not running" % md)
    why = not_ours(array, name)
    if why:
        return _refused(why)
    info = _examine(device)
    if ownership(info, name) is None:
        return _refused("%s: no superblock of array %s: not re-added" % (device, name))
    uuid = (_detail(array) or {}).get("MD_UUID", "").lower()
    if info.get("MD_UUID", "").lower() != uuid:
        return _refused("%s belongs to another array (uuid %s) than %s (uuid %s)" % (
            device, info.get("MD_UUID"), array, uuid))
    if _holder_md(device):
        return _refused("%s is held by an md array already" % device)
    return _run(["mdadm", "--manage", array, "--re-add", device])


@privileged.default.entrypoint
def md_add(name, device):
    """``--add`` a blank leg (no md superblock) to our running /dev/md/<name>."""
    md, device = "/dev/md/" + alias(name), nvme_devices([device])[0]
    array = _find_array(md, [])
    if array is None:
        return _refused("%s is not running" % md)
    why = not_ours(array, name)
    if why:
        return _refused(why)
    if _examine(device):
        return _refused("%s carries an md superblock: never added over" % device)
    return _run(["mdadm", "--manage", array, "--add", device])


@privileged.default.entrypoint
def md_stop(name, node=None):
    """Stop our /dev/md/<name> (``not_ours`` refuses any other array).  ``node`` is the
    ``/dev/mdN`` the caller saw behind the link: udev drops the link of an array whose legs
    all died.  An array with no member left holds no data and is stopped whoever made it."""
    name = alias(name)
    if node is not None and not (isinstance(node, str)
                                 and re.fullmatch("/dev/" + names.MD_DEVICE, node)):
        raise PrivilegedArgumentError("not an md device: %r" % (node,))
    array = _find_array("/dev/md/" + name, []) or node
    if array is None:
        return stop_array(name)
    device = _md_node(array)
    if device is None or not _empty(device):
        why = not_ours(array, name)
        if why:
            return _refused(why)
    return stop_array(name, device=device)


def _empty(node):
    """Does the md array hold no device any more (sysfs ``slaves`` readable and empty)?
    Anything unclear counts as not empty: the ownership check then decides."""
    try:
        return not os.listdir(os.path.join(SYS_BLOCK, os.path.basename(node), "slaves"))
    except OSError:
        return False


def _md_node(array):
    """``/dev/mdN`` behind an array path (the alias link resolved), or None."""
    real = os.path.realpath(os.path.join(DEV, array[len("/dev/"):]))
    node = "/dev/" + os.path.relpath(real, DEV)
    return node if re.fullmatch("/dev/" + names.MD_DEVICE, node) else None


def stop_array(name, dev="/dev", device=None):
    """Stop the array (its md device node when known: udev may drop the /dev/md/<name> link
    of an array that lost its legs, the array stays), then remove the alias link if it
    dangles.

    udev removes the link when the array goes; without udev (containers, minimal hosts) it
    would stay behind pointing at nothing.  Only a symlink whose target is gone is removed.
    """
    name = alias(name)
    if device is not None and not re.fullmatch("/dev/" + names.MD_DEVICE, device):
        raise PrivilegedArgumentError("not an md device: %r" % (device,))
    result = _run(["mdadm", "--stop", device or "/dev/md/" + name])
    if result["ok"]:
        link = os.path.join(dev, "md", name)
        try:
            if os.path.islink(link) and not os.path.exists(link):
                os.unlink(link)
        except OSError:
            pass            # udev got there first
    return result


#: why a degraded array is not grown (the library's error names it)
GROW_DEGRADED = ("%s is degraded: growing it now would keep the absent legs out for good (md "
                 "re-adds no leg smaller than the array); heal the volume, then extend")


@privileged.default.entrypoint
def md_grow(name):
    md = "/dev/md/" + alias(name)
    why = not_ours(md, name)
    if why:
        return _refused(why)
    if _degraded(md):
        return _refused(GROW_DEGRADED % md)
    return _run(["mdadm", "--grow", md, "--size", "max"])


def _degraded(array):
    """Does md count a missing or failed leg in the array (sysfs ``md/degraded``)?"""
    node = _md_node(array)
    try:
        with open(os.path.join(host.SYS, "block", os.path.basename(node or ""),
                               "md/degraded")) as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return False            # no such array: mdadm says so


def _examine(device, roles=False):
    """``mdadm --examine --export`` of ``device`` (None: no md superblock); with ``roles``
    also its role and recorded array state (a second mdadm run: the export has neither)."""
    export = ["mdadm", "--examine", "--export", device]
    if roles:       # both runs at once: under emulation an mdadm run is ~0.1 s
        result, full = threads.map_concurrently("md-examine-roles", _run, [
            export, ["mdadm", "--examine", device]])
    else:
        result, full = _run(export), None
    if not result["ok"]:
        return None
    info = _export(result["out"]) or None
    if info and full is not None:
        info.update(examine_roles(full["out"]) if full["ok"] else {})
    return info


_ROLE_RE = re.compile(r"^\s*Device Role : (?:Active device (\d{1,3})|(\w+))\s*$", re.M)
_STATE_RE = re.compile(r"^\s*Array State : ([AR.?]{1,64})(?:\s|$)", re.M)


def examine_roles(text):
    """From ``mdadm --examine`` (1.x metadata): ``MD_DEVICE_ROLE``, the leg's role number
    (or "spare", "faulty" ...), and ``MD_ARRAY_STATE``, the roles it believed active when
    it last wrote its superblock (``AA``, ``A.``): what ``nvmeof_mp.mdplan`` judges."""
    found = {}
    role = _ROLE_RE.search(text or "")
    if role:
        found["MD_DEVICE_ROLE"] = role.group(1) or role.group(2).lower()
    state = _STATE_RE.search(text or "")
    if state:
        found["MD_ARRAY_STATE"] = state.group(1)
    return found


@privileged.default.entrypoint
def md_examine(device):
    """``mdadm --examine --export`` plus the leg's role and recorded array state
    (``examine_roles``): does a leg carry an md superblock, of which array, and what did it
    last see of it."""
    return _examine(nvme_devices([device])[0], roles=True)

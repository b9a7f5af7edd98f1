"""Names, patterns and paths the library and its root daemon share, defined once.

The daemon checks every argument again, so it needs the same patterns as the code that made
the argument; both import them from here.  Patterns are strings without anchors: compile or
embed them and match with ``re.fullmatch``.  Stdlib only (the daemon imports it).
"""

#: a controller (``nvme3``); the kernel numbers controllers and subsystems from 0
CONTROLLER = r"nvme(\d{1,5})"
#: a namespace block device: a native multipath head or one controller's own (``nvme1n2``)
NAMESPACE = r"nvme(\d{1,5})n(\d{1,5})"
#: one controller's path to a multipath head (``nvme1c3n2``), in sysfs only
NAMESPACE_PATH = r"nvme(\d{1,5})c(\d{1,5})n(\d{1,5})"

#: the characters of a name we hand to md or device-mapper: a letter or digit, then these
_NAME_START, _NAME_REST = r"[A-Za-z0-9]", r"[A-Za-z0-9_.-]"
#: the ``alias`` of a RAID1 connection info (Cinder's, up to 255 characters)
VOLUME_ALIAS = _NAME_START + _NAME_REST + "{0,254}"
#: an md array name under /dev/md/ (md keeps 32 bytes; raid.md_name shortens an alias)
MD_NAME = _NAME_START + _NAME_REST + "{0,31}"
#: a device-mapper map name (``dmsetup`` allows 127 characters)
DM_NAME = _NAME_START + r"[A-Za-z0-9_.:-]{0,127}"

#: controller timeouts an attach may change on a live controller (sysfs attributes)
TUNABLE_ATTRS = ("ctrl_loss_tmo", "reconnect_delay", "fast_io_fail_tmo")

#: an md array's kernel name (``md127``)
MD_DEVICE = r"md\d{1,5}"

#: the attachment registry, below a root (``/`` on a host)
STATE_DIR = "var/lib/nvmeof_mp"
#: where the daemon keeps the system UUID it read as root (DMI is root-only on some hosts)
SYSTEM_UUID_CACHE = "/run/nvmeof_mp/system-uuid"

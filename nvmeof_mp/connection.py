"""Connection information -> typed, validated request.

Cinder drivers hand the connector a dict.  Everything in it is checked here, before anything
touches the host, and every error names the offending key.  The caller's dict is never mutated.

Formats accepted (see doc/source/connection-info.rst):

* new style: ``vol_uuid``, ``target_nqn``, ``portals: [(traddr, trsvcid, transport), ...]``,
  optional ``volume_nguid``, ``ns_id``, ``host_nqn``;
* old style: ``nqn``, ``transport_type``, ``target_portal``, ``target_port``, ``ns_id`` /
  ``volume_nguid``;
* RAID1: ``volume_replicas`` (list of new-style dicts), ``replica_count``, ``alias``;
* DeviceMapper: ``dm_replicas`` (list of new-style dicts) with a top-level ``vol_uuid``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import unicodedata
import uuid as uuidlib
from collections.abc import Mapping
from typing import Any

from nvmeof_mp import names
from nvmeof_mp.exception import InvalidConnectionInfo

# NQNs are taken as real targets name them (Cinder's nvmet helper makes
# "nqn.nvme-subsystem-1-<uuid>", not the spec's "nqn.yyyy-mm.<domain>:..."): what is refused is
# what the kernel refuses (more than 223 bytes, empty) and what would split the kernel's
# comma-separated "key=value" fabrics option string or an argv: ',', '=', whitespace, control
# and format characters, and a leading '-'.
NQN_MAX_BYTES = 223
# An IPv6 scope ID names a network interface (Linux: at most 15 bytes, no '/', ':' or
# whitespace) or is its index; Python's ipaddress would take any text after '%'.
_SCOPE_RE = re.compile(r"^(?:[A-Za-z0-9_.-]{1,15}|\d{1,10})$")
# An md alias as Cinder drivers send it (KumoScale: "volume-<uuid>", 43 characters): md's
# 32-byte name limit is handled by ``raid.md_name``, not refused here.
_ALIAS_RE = re.compile("^%s$" % names.VOLUME_ALIAS)
_SECRET_RE = re.compile(r"^DHHC-1:0[0-3]:[A-Za-z0-9+/=]+:$")
_TRANSPORTS = {"tcp": "tcp", "rdma": "rdma", "rocev2": "rdma"}
SECRET_KEYS = ("dhchap_secret", "dhchap_ctrl_secret")


class Mode(enum.Enum):
    SINGLE = "single"            # one portal
    MULTIPATH = "multipath"      # several portals of one NQN (native NVMe multipath / ANA)
    RAID = "raid"                # md RAID1 over volume_replicas
    DEVICE_MAPPER = "dm"         # dm-multipath map over dm_replicas


@dataclasses.dataclass(frozen=True)
class Portal:
    """One transport address of a target, as the kernel matches it."""

    traddr: str
    trsvcid: str
    transport: str = "tcp"

    def __str__(self):
        return "%s://%s:%s" % (self.transport, _bracket(self.traddr), self.trsvcid)


@dataclasses.dataclass(frozen=True)
class Target:
    """One NVMe subsystem + namespace: a single volume or one replica of a replicated volume."""

    nqn: str
    portals: tuple[Portal, ...]
    uuid: str | None = None
    nguid: str | None = None
    nsid: int | None = None
    host_nqn: str | None = None
    dhchap_secret: str | None = dataclasses.field(default=None, repr=False)
    dhchap_ctrl_secret: str | None = dataclasses.field(default=None, repr=False)

    @property
    def identity(self):
        """How to recognise the namespace, strongest first (uuid, nguid, nsid)."""
        if self.uuid:
            return "uuid", self.uuid
        if self.nguid:
            return "nguid", self.nguid
        return "nsid", self.nsid

    def describe(self):
        kind, value = self.identity
        return "%s %s=%s" % (self.nqn, kind, value)


@dataclasses.dataclass(frozen=True)
class VolumeRequest:
    """A validated connection request.  ``targets`` has one entry, or one per replica."""

    mode: Mode
    targets: tuple[Target, ...]
    vol_uuid: str | None = None
    alias: str | None = None
    replica_count: int | None = None
    enforce_multipath: bool = False

    @property
    def target(self) -> Target:
        return self.targets[0]

    @property
    def replicated(self):
        return self.mode in (Mode.RAID, Mode.DEVICE_MAPPER)

    @property
    def volume_key(self):
        """What names this volume on the host (its lock): the md alias, the dm map, or the
        namespace of a subsystem."""
        if self.mode is Mode.RAID:
            return "md:" + self.alias
        if self.mode is Mode.DEVICE_MAPPER:
            return "dm:" + self.vol_uuid
        kind, value = self.target.identity
        return "ns:%s|%s=%s" % (self.target.nqn, kind, value)

    def describe(self):
        if self.mode is Mode.RAID:
            return "raid1 %s over %d replicas" % (self.alias, len(self.targets))
        if self.mode is Mode.DEVICE_MAPPER:
            return "dm-multipath %s over %d replicas" % (self.vol_uuid, len(self.targets))
        return "%s (%d portal%s)" % (
            self.target.describe(), len(self.target.portals),
            "" if len(self.target.portals) == 1 else "s")


def parse(info: Mapping[str, Any]) -> VolumeRequest:
    """Turn Cinder's connection information into a VolumeRequest or raise InvalidConnectionInfo."""
    if not isinstance(info, Mapping):
        raise InvalidConnectionInfo("connection_properties", "must be a dict, got %s"
                                    % type(info).__name__)
    has_raid = info.get("volume_replicas") is not None
    has_dm = info.get("dm_replicas") is not None
    if has_raid and has_dm:
        raise InvalidConnectionInfo(
            "dm_replicas", "cannot be combined with volume_replicas (RAID over DeviceMapper "
            "is not supported)")
    enforce = _bool(info, "enforce_multipath", False)
    if has_raid:
        targets = _replicas(info, "volume_replicas")
        count = info.get("replica_count")
        if count is None:
            count = len(targets)
        elif not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InvalidConnectionInfo("replica_count", "must be a positive integer")
        elif count < len(targets):
            # more (KumoScale: a replica whose backend is away is not listed) is allowed:
            # the array is then assembled degraded, never created (see raid.plan)
            raise InvalidConnectionInfo(
                "replica_count", "is %d but volume_replicas lists %d" % (count, len(targets)))
        alias = info.get("alias")
        if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
            raise InvalidConnectionInfo(
                "alias", "required for volume_replicas; 1-255 characters of [A-Za-z0-9_.-], "
                "starting with a letter or digit")
        vol_uuid = _opt_uuid(info, "vol_uuid")
        return VolumeRequest(Mode.RAID, targets, vol_uuid=vol_uuid, alias=alias,
                             replica_count=count, enforce_multipath=enforce)
    if has_dm:
        targets = _replicas(info, "dm_replicas")
        vol_uuid = _opt_uuid(info, "vol_uuid")
        if vol_uuid is None:
            raise InvalidConnectionInfo("vol_uuid", "required with dm_replicas (it names the map)")
        nqns = [t.nqn for t in targets]
        if len(set(nqns)) != len(nqns):
            raise InvalidConnectionInfo("dm_replicas", "each replica needs its own target_nqn")
        return VolumeRequest(Mode.DEVICE_MAPPER, targets, vol_uuid=vol_uuid,
                             enforce_multipath=enforce)
    target = _target(info, "")
    mode = Mode.MULTIPATH if len(target.portals) > 1 else Mode.SINGLE
    return VolumeRequest(mode, (target,), vol_uuid=target.uuid, enforce_multipath=enforce)


def redact(info: Any) -> Any:
    """A copy of connection information that is safe to log (secrets masked)."""
    if isinstance(info, Mapping):
        return {k: ("***" if k in SECRET_KEYS and v else redact(v)) for k, v in info.items()}
    if isinstance(info, (list, tuple)):
        return type(info)(redact(v) for v in info)
    return info


# -- helpers -------------------------------------------------------------------------------

def _replicas(info, key):
    replicas = info.get(key)
    if not isinstance(replicas, (list, tuple)) or not replicas:
        raise InvalidConnectionInfo(key, "must be a non-empty list of replicas")
    targets = []
    for i, rep in enumerate(replicas):
        where = "%s[%d]" % (key, i)
        if not isinstance(rep, Mapping):
            raise InvalidConnectionInfo(where, "must be a dict")
        if "volume_replicas" in rep or "dm_replicas" in rep:
            raise InvalidConnectionInfo(where, "replicas cannot nest replicas (RAID over "
                                        "DeviceMapper is not supported)")
        targets.append(_target(rep, where + ".", inherited=info))
    return tuple(targets)


def _target(info, prefix, inherited=None):
    """Parse one target (new or old style).  ``prefix`` makes error keys precise."""
    inherited = inherited or {}
    nqn_key = "target_nqn" if "target_nqn" in info else ("nqn" if "nqn" in info else None)
    if nqn_key is None:
        raise InvalidConnectionInfo(prefix + "target_nqn", "missing")
    nqn = validate_nqn(info[nqn_key], prefix + nqn_key)
    if "portals" in info:
        portals = _portals(info["portals"], prefix + "portals")
    elif "target_portal" in info:
        portals = (validate_portal((info.get("target_portal"), info.get("target_port"),
                            info.get("transport_type", "tcp")), prefix + "target_portal"),)
    else:
        raise InvalidConnectionInfo(prefix + "portals", "missing")
    uuid = _opt_uuid(info, "vol_uuid", prefix)
    nguid = _opt_nguid(info, "volume_nguid", prefix)
    nsid = _opt_nsid(info, "ns_id", prefix)
    if uuid is None and nguid is None and nsid is None:
        raise InvalidConnectionInfo(prefix + "vol_uuid", "missing: one of vol_uuid, "
                                    "volume_nguid or ns_id identifies the namespace")
    host_nqn = info.get("host_nqn", inherited.get("host_nqn"))
    if host_nqn is not None:
        host_nqn = validate_nqn(host_nqn, prefix + "host_nqn")
    secrets = {}
    for key in SECRET_KEYS:
        value = info.get(key, inherited.get(key))
        if value is not None and not valid_secret(value):
            # never echo the value: it is a secret
            raise InvalidConnectionInfo(prefix + key, "not a DH-HMAC-CHAP secret "
                                        "(expected DHHC-1:0N:<base64>:)")
        secrets[key] = value
    return Target(nqn=nqn, portals=portals, uuid=uuid, nguid=nguid, nsid=nsid,
                  host_nqn=host_nqn, **secrets)


def valid_secret(value):
    """Is ``value`` a DH-HMAC-CHAP secret in its transport form (DHHC-1:0N:<base64>:)?"""
    return isinstance(value, str) and bool(_SECRET_RE.fullmatch(value))


def validate_nqn(value, key):
    if not isinstance(value, str) or not value:
        raise InvalidConnectionInfo(key, "must be a non-empty string")
    if len(value.encode("utf-8")) > NQN_MAX_BYTES:
        raise InvalidConnectionInfo(key, "longer than %d bytes" % NQN_MAX_BYTES)
    bad = unsafe_char(value)
    if bad:
        raise InvalidConnectionInfo(key, "not usable as an NVMe Qualified Name: %s" % bad)
    return value


def unsafe_char(value, argv=True):
    """Why ``value`` cannot travel in a fabrics option string (or, with ``argv``, also as an
    argument of a tool, where a leading '-' reads as an option), or None."""
    if argv and value.startswith("-"):
        return "starts with '-'"
    for ch in value:
        if ch in ",=":
            return "contains %r" % ch
        if unicodedata.category(ch)[0] == "C":
            return "contains a control or format character (U+%04X)" % ord(ch)
        if ch.isspace():
            return "contains whitespace"
    return None


def _portals(value, key):
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidConnectionInfo(key, "must be a non-empty list of (traddr, trsvcid, "
                                    "transport)")
    portals = []
    for i, item in enumerate(value):
        portal = validate_portal(item, "%s[%d]" % (key, i))
        if portal in portals:
            raise InvalidConnectionInfo("%s[%d]" % (key, i), "duplicate portal %s" % portal)
        portals.append(portal)
    return tuple(portals)


def validate_portal(item, key):
    if not isinstance(item, (list, tuple)) or len(item) != 3:
        raise InvalidConnectionInfo(key, "must be (traddr, trsvcid, transport)")
    traddr, trsvcid, transport = item
    if not isinstance(traddr, str) or not traddr:
        raise InvalidConnectionInfo(key, "traddr must be a non-empty string")
    address, percent, scope = traddr.strip("[]").partition("%")
    if percent and not _SCOPE_RE.fullmatch(scope):
        raise InvalidConnectionInfo(key, "traddr %r: the IPv6 scope ID must be an interface "
                                    "name or index" % traddr)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidConnectionInfo(key, "traddr %r is not an IPv4 or IPv6 address" % traddr)
    if percent and ip.version != 6:
        raise InvalidConnectionInfo(key, "traddr %r: a scope ID needs an IPv6 address"
                                    % traddr)
    traddr = str(ip) + percent + scope
    if isinstance(trsvcid, bool):
        raise InvalidConnectionInfo(key, "trsvcid must be a port number")
    try:
        port = int(str(trsvcid).strip())
    except ValueError:
        raise InvalidConnectionInfo(key, "trsvcid %r is not a port number" % (trsvcid,))
    if not 1 <= port <= 65535:
        raise InvalidConnectionInfo(key, "trsvcid %d is outside 1-65535" % port)
    if not isinstance(transport, str) or transport.lower() not in _TRANSPORTS:
        raise InvalidConnectionInfo(key, "transport %r is not supported (tcp, rdma, RoCEv2)"
                                    % (transport,))
    return Portal(traddr, str(port), _TRANSPORTS[transport.lower()])


def _opt_uuid(info, key, prefix=""):
    value = info.get(key)
    if value is None:
        return None
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise InvalidConnectionInfo(prefix + key, "%r is not a UUID" % (value,))


def _opt_nguid(info, key, prefix=""):
    value = info.get(key)
    if value is None:
        return None
    hexdigits = str(value).replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", hexdigits):
        raise InvalidConnectionInfo(prefix + key, "%r is not a 16-byte NGUID" % (value,))
    return str(uuidlib.UUID(hexdigits))  # the kernel prints nguid in uuid form


def _opt_nsid(info, key, prefix=""):
    value = info.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidConnectionInfo(prefix + key, "must be a namespace id")
    try:
        nsid = int(str(value).strip())
    except ValueError:
        raise InvalidConnectionInfo(prefix + key, "%r is not a namespace id" % (value,))
    if not 1 <= nsid <= 0xFFFFFFFE:
        raise InvalidConnectionInfo(prefix + key, "%d is outside 1-4294967294" % nsid)
    return nsid


def _bool(info, key, default):
    value = info.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise InvalidConnectionInfo(key, "must be a boolean")


def _bracket(addr):
    return "[%s]" % addr if ":" in addr else addr

"""Connection information -> VolumeRequest: formats, modes and precise errors."""

import copy

import ddt
import pytest
import unittest
from hypothesis import given, settings, strategies as st

from nvmeof_mp import connection
from nvmeof_mp.connection import Mode, Portal
from nvmeof_mp.exception import InvalidConnectionInfo

from simlab import NQN, UUID, UUID2, P1, P2, conninfo

REPLICA_A = {"vol_uuid": UUID, "target_nqn": NQN + "-a", "portals": [P1]}
REPLICA_B = {"vol_uuid": UUID2, "target_nqn": NQN + "-b", "portals": [P2]}


def test_new_style_single_and_multipath():
    single = connection.parse(conninfo(portals=[P1]))
    assert single.mode is Mode.SINGLE
    assert single.target.portals == (Portal("127.0.0.1", "4420", "tcp"),)
    multi = connection.parse(conninfo())
    assert multi.mode is Mode.MULTIPATH
    assert [p.trsvcid for p in multi.target.portals] == ["4420", "4421"]
    assert multi.target.identity == ("uuid", UUID)


def test_old_style_is_converted_without_mutating_the_callers_dict():
    info = {"nqn": NQN, "transport_type": "RoCEv2", "target_portal": "10.0.0.5",
            "target_port": "4420", "ns_id": "3", "volume_nguid": "8d2f4f9a1b7e4c2a9a553f1e6c2b7d01"}
    before = copy.deepcopy(info)
    req = connection.parse(info)
    assert info == before
    assert req.target.portals == (Portal("10.0.0.5", "4420", "rdma"),)
    assert req.target.nsid == 3
    assert req.target.nguid == "8d2f4f9a-1b7e-4c2a-9a55-3f1e6c2b7d01"
    assert req.target.identity[0] == "nguid"


def test_portals_as_json_lists_and_uppercase_uuid():
    req = connection.parse(conninfo(uuid=UUID.upper(), portals=[["127.0.0.1", "4420", "TCP"]]))
    assert req.target.uuid == UUID
    assert req.target.portals[0].transport == "tcp"


def test_ipv6_portal_is_normalised():
    req = connection.parse(conninfo(portals=[("[fe80::0001]", 4420, "tcp")]))
    assert req.target.portals[0].traddr == "fe80::1"
    assert str(req.target.portals[0]) == "tcp://[fe80::1]:4420"


@ddt.ddt
class TestInvalid(unittest.TestCase):
    @ddt.data(
        ({"portals": [P1], "vol_uuid": UUID}, "target_nqn", "missing"),
        (conninfo(target_nqn="nqn.2014-08.org.x:a\nb"), "target_nqn", "control"),
        (conninfo(target_nqn="nqn.2014-08.org.x:" + "a" * 220), "target_nqn", "223 bytes"),
        (conninfo(target_nqn="nqn.2014-08.org.x:a,traddr=1.2.3.4"), "target_nqn", "','"),
        (conninfo(portals=[]), "portals", "non-empty"),
        (conninfo(portals=[("127.0.0.1", 0, "tcp")]), "portals[0]", "outside 1-65535"),
        (conninfo(portals=[("127.0.0.1", 65536, "tcp")]), "portals[0]", "outside 1-65535"),
        (conninfo(portals=[("127.0.0.1", "http", "tcp")]), "portals[0]", "not a port"),
        (conninfo(portals=[("127.0.0.1", 4420, "fc")]), "portals[0]", "not supported"),
        (conninfo(portals=[("host.example", 4420, "tcp")]), "portals[0]", "not an IPv4"),
        (conninfo(portals=[("127.0.0.1", 4420)]), "portals[0]", "(traddr, trsvcid"),
        (conninfo(portals=[P1, P1]), "portals[1]", "duplicate"),
        (conninfo(uuid="not-a-uuid"), "vol_uuid", "not a UUID"),
        ({"target_nqn": NQN, "portals": [P1]}, "vol_uuid", "one of vol_uuid"),
        (conninfo(ns_id="zero"), "ns_id", "not a namespace id"),
        (conninfo(volume_nguid="123"), "volume_nguid", "NGUID"),
        (conninfo(host_nqn="bad host"), "host_nqn", "whitespace"),
        (conninfo(dhchap_secret="hunter2"), "dhchap_secret", "DH-HMAC-CHAP"),
        ({"volume_replicas": [REPLICA_A], "dm_replicas": [REPLICA_B], "alias": "x"},
         "dm_replicas", "cannot be combined"),
        ({"volume_replicas": [REPLICA_A, {"dm_replicas": [REPLICA_B]}], "alias": "v"},
         "volume_replicas[1]", "cannot nest"),
        ({"volume_replicas": [REPLICA_A]}, "alias", "required"),
        ({"volume_replicas": [REPLICA_A], "alias": "../etc"}, "alias", "1-255 characters"),
        ({"volume_replicas": [REPLICA_A, REPLICA_B], "alias": "v", "replica_count": 1},
         "replica_count", "lists 2"),
        ({"volume_replicas": []}, "volume_replicas", "non-empty"),
        ({"volume_replicas": [dict(REPLICA_A, portals=[("1.2.3.4", 99999, "tcp")])],
          "alias": "v"}, "volume_replicas[0].portals[0]", "outside"),
        ({"dm_replicas": [REPLICA_A, REPLICA_B]}, "vol_uuid", "names the map"),
        ({"dm_replicas": [REPLICA_A, dict(REPLICA_B, target_nqn=REPLICA_A["target_nqn"])],
          "vol_uuid": UUID}, "dm_replicas", "own target_nqn"),
        ("not a dict", "connection_properties", "must be a dict"),
    )
    @ddt.unpack
    def test_error_names_the_key(self, info, key, reason):
        with self.assertRaises(InvalidConnectionInfo) as cm:
            connection.parse(info)
        self.assertEqual(key, cm.exception.key)
        self.assertIn(reason, str(cm.exception))
        self.assertIn(key, str(cm.exception))


def test_secret_never_appears_in_errors_or_redacted_logs():
    secret = "DHHC-1:00:ia6zGodOr4SEG0Zzaw398rpY0wqipUWj4jWjUh4HWUz6aQ2n:"
    bad = conninfo(dhchap_ctrl_secret=secret + "x")
    with pytest.raises(InvalidConnectionInfo) as exc:
        connection.parse(bad)
    assert secret not in str(exc.value)
    req = connection.parse(conninfo(dhchap_secret=secret))
    assert secret not in repr(req)
    assert secret not in str(connection.redact(conninfo(dhchap_secret=secret)))


def test_raid_and_dm_modes():
    raid = connection.parse({"volume_replicas": [REPLICA_A, REPLICA_B], "alias": "vol1"})
    assert raid.mode is Mode.RAID and raid.replica_count == 2 and raid.alias == "vol1"
    one = connection.parse({"volume_replicas": [REPLICA_A], "replica_count": 1, "alias": "v"})
    assert one.mode is Mode.RAID and len(one.targets) == 1
    dm = connection.parse({"dm_replicas": [REPLICA_A, dict(REPLICA_B, portals=[P1, P2])],
                           "vol_uuid": UUID})
    assert dm.mode is Mode.DEVICE_MAPPER and dm.vol_uuid == UUID
    assert len(dm.targets[1].portals) == 2


# -- fuzzing: bad input always gives the clear error, never anything else ---------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["vol_uuid", "target_nqn", "portals", "nqn", "ns_id", "volume_nguid",
                         "volume_replicas", "dm_replicas", "alias", "replica_count",
                         "target_portal", "target_port", "transport_type", "host_nqn"]),
        children, max_size=6),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(_json)
def test_fuzz_parse_raises_only_invalid_connection_info(info):
    try:
        req = connection.parse(info)
    except InvalidConnectionInfo as e:
        assert e.key and e.reason
        return
    assert req.targets   # whatever parsed is complete


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.one_of(st.integers(), st.text(max_size=8)),
       st.text(max_size=8))
def test_fuzz_portals(addr, port, transport):
    try:
        req = connection.parse(conninfo(portals=[(addr, port, transport)]))
    except InvalidConnectionInfo as e:
        assert e.key == "portals[0]"
        return
    p = req.target.portals[0]
    assert 1 <= int(p.trsvcid) <= 65535 and p.transport in ("tcp", "rdma")

"""Extend of a replicated volume that is attached degraded (one replica unreachable).

Nova extends an attached volume whatever its health: the replicas that are attached grow and
the md array / dm map grows with them; the absent replica is brought back by the next heal.
"""

import pytest

from nvmeof_mp.exception import NVMeOFError

from test_replicated import NQA, NQB, UUID_TOP, dm_info, raid_info, two  # noqa: F401

GROWN = 262144      # sectors of each namespace after the resize (128 MiB)


def grow_both(lab):
    lab.sim.resize(NQA, 1, GROWN)
    lab.sim.resize(NQB, 1, GROWN)


def test_raid_extend_while_a_leg_is_away_grows_the_array(two):  # noqa: F811
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info(), None)          # the legs carry superblocks
    two.sim.portal(NQB, 4421).mode = "refuse"
    result = two.connector.connect_volume(raid_info())
    assert result["degraded"] and list(two.sim.md["vol1"]["legs"]) == ["/dev/nvme0n1"]
    grow_both(two)
    assert two.connector.extend_volume(raid_info()) == (GROWN - 2048) * 512
    assert two.sim.md["vol1"]["size"] == GROWN - 2048
    two.sim.portal(NQB, 4421).mode = "up"
    healed = two.connector.check_paths(raid_info())
    assert healed["readded"] and len(two.sim.md["vol1"]["legs"]) == 2
    assert two.sim.md["vol1"]["size"] == GROWN - 2048


def test_dm_extend_while_a_replica_is_away_reloads_the_map_over_the_others(two):  # noqa: F811
    two.sim.portal(NQB, 4421).mode = "refuse"
    result = two.connector.connect_volume(dm_info())
    assert result["degraded"] and len(two.sim.dm[UUID_TOP]["paths"]) == 1
    grow_both(two)
    assert two.connector.extend_volume(dm_info()) == GROWN * 512
    assert two.sim.dm[UUID_TOP]["size"] == GROWN and len(two.sim.dm[UUID_TOP]["paths"]) == 1
    two.sim.portal(NQB, 4421).mode = "up"
    two.connector.check_paths(dm_info())
    table = two.sim.dm[UUID_TOP]
    assert table["size"] == GROWN and set(table["paths"].values()) == {"A"}
    assert len(table["paths"]) == 2


@pytest.mark.parametrize("info", [raid_info, dm_info])
def test_extend_with_no_replica_attached_is_an_error(two, info):  # noqa: F811
    two.connector.connect_volume(info())
    for nqn in (NQA, NQB):
        two.sim.resize(nqn, 1, GROWN)
    two.connector.disconnect_volume(info(), None)
    with pytest.raises(NVMeOFError):
        two.connector.extend_volume(info())

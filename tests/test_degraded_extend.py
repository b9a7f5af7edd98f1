"""Extend of a replicated volume that is attached degraded (one replica unreachable).

Nova extends an attached volume whatever its health.  dm-multipath: the replicas attached now
grow and the map grows over them; the absent replica comes back at the new size with the next
heal.  RAID1: md cannot re-add a leg to an array grown without it, so the extend of a
degraded array is refused with a reason (the daemon refuses the grow), and works after the heal.
"""

import json

import pytest

from nvmeof_mp.exception import NVMeOFError, ReplicaError

from test_replicated import NQA, NQB, UUID_TOP, dm_info, raid_info, two  # noqa: F401

GROWN = 262144      # sectors of each namespace after the resize (128 MiB)


def grow_both(lab):
    lab.sim.resize(NQA, 1, GROWN)
    lab.sim.resize(NQB, 1, GROWN)


def test_raid_extend_while_a_leg_is_away_is_refused_until_the_heal(two):  # noqa: F811
    """md refuses to re-add a leg whose superblock records a size below the array's (the
    real kernel: "--re-add ... is not possible"): an array grown without a leg would keep
    it out for good.  The extend says so and grows nothing; after the heal it grows."""
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info(), None)          # the legs carry superblocks
    two.sim.portal(NQB, 4421).mode = "refuse"
    result = two.connector.connect_volume(raid_info())
    assert result["degraded"] and list(two.sim.md["vol1"]["legs"]) == ["/dev/nvme0n1"]
    before = two.sim.md["vol1"]["size"]
    grow_both(two)
    with pytest.raises(ReplicaError, match="degraded.*heal"):
        two.connector.extend_volume(raid_info())
    assert two.sim.md["vol1"]["size"] == before
    two.sim.portal(NQB, 4421).mode = "up"
    healed = two.connector.check_paths(raid_info())
    assert healed["readded"] and len(two.sim.md["vol1"]["legs"]) == 2
    assert two.connector.extend_volume(raid_info()) == (GROWN - 2048) * 512
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


def test_dm_heal_never_shrinks_a_map_grown_without_a_replica(two):  # noqa: F811
    """The map grew over replica A while B was away, and B comes back at its old size (its
    target was not extended): the heal must leave B out, not cut the map down to B's size
    under the data written past it."""
    two.sim.portal(NQB, 4421).mode = "refuse"
    two.connector.connect_volume(dm_info())
    two.sim.resize(NQA, 1, GROWN)
    assert two.connector.extend_volume(dm_info()) == GROWN * 512
    two.sim.portal(NQB, 4421).mode = "up"
    result = two.connector.connect_volume(dm_info())          # attach again = heal
    table = two.sim.dm[UUID_TOP]
    assert table["size"] == GROWN and len(table["paths"]) == 1, table
    assert result["degraded"]
    b = next(r for r in result["replicas"] if r["nqn"] == NQB)
    assert b["degraded"] and "smaller" in b["error"], b
    two.sim.resize(NQB, 1, GROWN)                              # its target catches up
    two.sim.clock.sleep(1)
    healed = two.connector.connect_volume(dm_info())
    assert not healed["degraded"] and len(two.sim.dm[UUID_TOP]["paths"]) == 2
    assert two.sim.dm[UUID_TOP]["size"] == GROWN


def test_heal_that_leaves_a_raid_leg_out_says_so(two, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Every NVMe path is back but md keeps a leg out (its superblock is ahead of the array:
    never re-added): the heal must not read healthy, and ``nvmeof-mp heal`` exits 1."""
    from nvmeof_mp import cli
    two.connector.connect_volume(raid_info())
    two.connector.disconnect_volume(raid_info(), None)
    two.sim.portal(NQB, 4421).mode = "refuse"
    two.connector.connect_volume(raid_info())
    two.sim.superblocks[(NQB, 1)]["events"] = 99                 # split history
    two.sim.portal(NQB, 4421).mode = "up"
    report = two.connector.check_paths(raid_info())
    assert [r["verdict"] for r in report["after"]] == ["healthy", "healthy"]
    assert len(two.sim.md["vol1"]["legs"]) == 1                  # B stays out
    assert report["degraded"] and [leg["nqn"] for leg in report["left_out"]] == [NQB]
    path = tmp_path / "raid.json"
    path.write_text(json.dumps(raid_info()))
    monkeypatch.setattr(cli, "_connector", lambda args: two.connector)
    assert cli.main(["heal", str(path)]) == 1
    assert "still degraded" in capsys.readouterr().out


def test_heal_all_that_leaves_a_replica_out_says_so(two, monkeypatch, capsys):  # noqa: F811
    """``heal --all`` (the heal timer) over a volume whose every NVMe path is back but one
    replica is kept out (dm: smaller than the map grown without it): the entry says
    degraded and names the replica, and the command exits 1 - a timer's log must not read
    "healed (healthy)" while the volume has one copy."""
    from nvmeof_mp import cli
    two.sim.portal(NQB, 4421).mode = "refuse"
    two.connector.connect_volume(dm_info())
    two.sim.resize(NQA, 1, GROWN)
    two.connector.extend_volume(dm_info())
    two.sim.portal(NQB, 4421).mode = "up"
    [entry] = two.connector.heal_all()
    assert entry["degraded"] and [leg["nqn"] for leg in entry["left_out"]] == [NQB], entry
    monkeypatch.setattr(cli, "_connector", lambda args: two.connector)
    assert cli.main(["heal", "--all"]) == 1
    out = capsys.readouterr().out
    assert "still degraded" in out and NQB in out, out

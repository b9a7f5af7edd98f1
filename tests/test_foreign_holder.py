"""A namespace that multipathd claims is never handed out, nor joined into md or dm.

multipathd with ``find_multipaths greedy`` on a host with ``nvme_core.multipath=N`` stacks a
map of its own on every new NVMe-oF namespace (seen in the lab, doc/source/faults.rst).  The
simulated host plays that multipathd (``SimHost.multipathd_greedy``): udev marks the device a
multipath path, then a map ``mpatha`` (dm uuid ``mpath-...``) holds it.  The attach must
fail with an error naming the map and the multipath drop-in that prevents it, and leave the
host as it found it: no controller, no md array, no dm map of ours, no registry record.
"""

import os
import re

import pytest

from nvmeof_mp.exception import ForeignClaim

from simlab import NQN, UUID, UUID2, conninfo

NQA, NQB = NQN + "-a", NQN + "-b"
UUID_TOP = "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11"
DROPIN = "/etc/multipath/conf.d/nvmeof-mp.conf"


def replica(nqn, uuid, port):
    return {"target_nqn": nqn, "vol_uuid": uuid, "portals": [["127.0.0.1", port, "tcp"]]}


def raid_info():
    return {"volume_replicas": [replica(NQA, UUID, 4420), replica(NQB, UUID2, 4421)],
            "alias": "vol1"}


def dm_info():
    return {"vol_uuid": UUID_TOP,
            "dm_replicas": [replica(NQA, UUID, 4420), replica(NQB, UUID2, 4421)]}


@pytest.fixture
def greedy(make_lab):
    """nvme_core.multipath=N, udev running, multipathd (greedy) claiming every namespace."""
    lab = make_lab(native=False, udev_delay=0.2)
    lab.target(nqn=NQN)
    lab.target(nqn=NQA, ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421,), namespaces=((1, UUID2),))
    lab.sim.multipathd_greedy(delay=0.5)
    return lab


def host_as_found(lab):
    assert lab.sim.controllers() == []
    assert lab.sim.md == {} and lab.sim.dm == {}
    assert lab.sim.calls["md_create"] == 0 and lab.sim.calls.get("dm_create", 0) == 0
    assert lab.connector.attachments() == []


def refused(lab, info):
    with pytest.raises(ForeignClaim) as caught:
        lab.connector.connect_volume(info)
    text = str(caught.value)
    # the holder by name, dm device and uuid (replicas attach at once: either may be first;
    # the simulated clock runs on the sleeps of both, so the one whose map the other's
    # sleeps outran may name udev's mark instead of the map)
    assert re.search(r"map mpath[ab] \(dm-\d+, uuid mpath-uuid\.", text) or (
        ("volume_replicas" in info or "dm_replicas" in info)
        and "DM_MULTIPATH_DEVICE_PATH=1" in text), text
    assert DROPIN in text, text                                 # and the fix
    host_as_found(lab)
    return text


def test_single_path_claimed_by_multipathd_is_not_handed_out(greedy):
    text = refused(greedy, conninfo())
    assert "nvme0n1" in text


def test_raid1_is_not_built_over_legs_multipathd_holds(greedy):
    refused(greedy, raid_info())


def test_dm_map_is_not_built_over_legs_multipathd_holds(greedy):
    refused(greedy, dm_info())


def test_a_claim_without_udev_is_seen_by_its_holder(make_lab):
    """No udev (no mark to wait on): a map already stacked on the namespace is enough."""
    lab = make_lab(native=False)
    lab.target()
    lab.sim.multipathd_greedy(delay=0.0)
    refused(lab, conninfo())


def test_our_own_dm_map_over_a_leg_is_no_foreign_claim(make_lab):
    """The connector's dm map (uuid ``nvmeof_mp-``) holds its legs; attaching the volume
    again (Nova does after a host restart) finds it there and goes on."""
    lab = make_lab(native=False)
    lab.target(nqn=NQA, ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421,), namespaces=((1, UUID2),))
    first = lab.connector.connect_volume(dm_info())
    with open(os.path.join(lab.root, "sys/class/block/dm-0/dm/uuid")) as f:
        assert f.read().strip() == "nvmeof_mp-" + UUID_TOP     # the simulated map is ours
    for leg in ("nvme0n1", "nvme1n1"):
        lab.sim.add_holder(leg, "dm-0")
    again = lab.connector.connect_volume(dm_info())
    assert again["path"] == first["path"] and not again["degraded"]


def test_the_drop_in_the_error_names_exists_and_blacklists_nvme_over_tcp_and_rdma():
    from nvmeof_mp import claims
    here = os.path.join(os.path.dirname(__file__), "..", claims.DROPIN.replace("/etc/", "etc/"))
    with open(here) as f:
        text = f.read()
    assert 'protocol "^nvme:(tcp|rdma)$"' in text and "blacklist {" in text


def test_root_waits_for_udevs_verdict_before_it_hands_a_device_out(make_lab):
    """Root opens a new node at once, before udev has run multipath-tools' rule: the attach
    must still wait for udev's database before it hands the device out.  (A service user
    could open the node once udev gave it its group, which udev does before it writes its
    database: the gate saw a single-path attach succeed under a greedy multipathd, whose map
    then held the device; test_single_path_claimed_by_multipathd_is_not_handed_out.)"""
    lab = make_lab(native=False, udev_delay=0.2)
    lab.target(nqn=NQN)
    lab.sim.multipathd_greedy(delay=0.5)
    lab.sim.caller_root = True
    refused(lab, conninfo())

"""The connector as Nova and Cinder call it: exclusion per volume, os-brick's semantics for
run_as_root and enforce_multipath, properties that never raise (simulated host)."""

import os
import threading

import pytest

from nvmeof_mp import blockdev
from nvmeof_mp.connector import NVMeOFConnector
from nvmeof_mp.exception import UnsupportedHost
from nvmeof_mp.sim import SimHost

from simlab import NQN, UUID, UUID2, conninfo

NQA, NQB = NQN + "-a", NQN + "-b"


def raid_info():
    return {"alias": "vol1", "volume_replicas": [
        {"target_nqn": NQA, "vol_uuid": UUID, "portals": [["127.0.0.1", 4420, "tcp"]]},
        {"target_nqn": NQB, "vol_uuid": UUID2, "portals": [["127.0.0.1", 4421, "tcp"]]}]}


def heal_during_flush(lab, monkeypatch, info):
    """Detach ``info``; while its flush runs, a timer's check_paths of the same volume starts.
    -> (was check_paths still waiting when the flush ended, its report)."""
    flush = lab.sim.flush_device
    outcome = {}

    def heal():
        outcome["report"] = lab.connector.check_paths(info)

    def flush_with_heal(path, *args):
        healer = threading.Thread(target=heal)
        healer.start()
        healer.join(0.5)
        outcome["waiting"] = healer.is_alive()
        outcome["thread"] = healer
        return flush(path, *args)
    monkeypatch.setattr(lab.sim, "flush_device", flush_with_heal)
    lab.connector.disconnect_volume(info, None)
    outcome["thread"].join(10)
    return outcome["waiting"], outcome["report"]


def test_heal_from_a_timer_cannot_reattach_a_volume_being_detached(lab, monkeypatch):
    lab.target()
    lab.connector.connect_volume(conninfo())
    waiting, report = heal_during_flush(lab, monkeypatch, conninfo())
    assert waiting, "check_paths ran in the middle of the detach"
    assert report["attached"] is False
    assert lab.sim.controllers() == []


def test_heal_waits_for_a_raid_detach(lab, monkeypatch):
    lab.target(nqn=NQA, ports=(4420,), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421,), namespaces=((1, UUID2),))
    lab.connector.connect_volume(raid_info())
    waiting, report = heal_during_flush(lab, monkeypatch, raid_info())
    assert waiting, "check_paths ran in the middle of the RAID detach"
    assert report["attached"] is False
    assert lab.sim.controllers() == [] and lab.sim.md == {}


def test_check_valid_device_reads_as_root_when_asked(lab):
    """Cinder's service user may not open the device: run_as_root goes through the daemon."""
    lab.target()
    path = lab.connector.connect_volume(conninfo())["path"]
    assert lab.connector.check_valid_device(path) is True
    assert lab.sim.calls["read_first_sector"] == 1
    # as the calling process: the simulated host's device does not exist on this machine
    assert lab.connector.check_valid_device(path, run_as_root=False) is False
    assert lab.sim.calls["read_first_sector"] == 1


def test_check_valid_device_answers_in_bounded_time(tmp_path, monkeypatch, lab):
    """A read queued with no usable path must not hang the caller (a FIFO never answers)."""
    fifo = str(tmp_path / "never")
    os.mkfifo(fifo)
    monkeypatch.setattr(blockdev, "READ_TIMEOUT", 0.2)
    try:
        assert lab.connector.check_valid_device(fifo, run_as_root=False) is False
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))    # let the reader go


@pytest.mark.parametrize("where", ["factory", "connection_info"])
def test_enforced_multipath_without_native_multipath_is_refused(make_lab, where):
    lab = make_lab(native=False)
    lab.target()
    info = conninfo()
    kwargs = {}
    if where == "factory":              # Nova: InitiatorConnector.factory(enforce_multipath=)
        kwargs["enforce_multipath"] = True
    else:
        info["enforce_multipath"] = True
    connector = lab.new_connector(**kwargs)
    with pytest.raises(UnsupportedHost, match="nvme_core multipath"):
        connector.connect_volume(info)
    assert sum(lab.sim.calls.values()) == 0


def test_requested_but_not_enforced_multipath_attaches_one_portal(make_lab):
    lab = make_lab(native=False)
    lab.target()
    assert lab.connector.connect_volume(conninfo())["path"]
    assert len(lab.sim.controllers()) == 1


def test_properties_never_raise(tmp_path, monkeypatch, caplog):
    """os-brick gathers every connector's properties in one loop: one that raises breaks
    iSCSI and RBD attaches too."""
    sim = SimHost(str(tmp_path), with_identity=False)
    os.unlink(os.path.join(sim.root, "sys/class/dmi/id/product_uuid"))

    def broken(*args):
        raise RuntimeError("privsep helper command exited non-zero (1)")
    monkeypatch.setattr(sim, "ensure_host_identity", broken)
    monkeypatch.setattr(sim, "read_system_uuid", broken)
    props = NVMeOFConnector.get_connector_properties(None, kernel=sim, root=sim.root)
    assert "nqn" not in props and "nvme_hostid" not in props and "system uuid" not in props
    assert props["nvme_native_multipath"] is True and "platform" in props
    assert "privsep helper command exited non-zero" in caplog.text


def test_single_path_with_spare_portals_is_not_degraded(make_lab, caplog):
    """Nova's default (volume_use_multipath=False) connects one portal of several: that is
    what was asked for, not a degraded attach (no warning at every attach)."""
    lab = make_lab(use_multipath=False)
    lab.target()
    lab.sim.portal(NQN, 4420).mode = "refuse"
    result = lab.connector.connect_volume(conninfo())
    assert result["degraded"] is False
    assert result["failed_portals"] == ["tcp://127.0.0.1:4420"]
    assert "DEGRADED" not in caplog.text

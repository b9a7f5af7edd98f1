"""The attachment registry end to end against the simulated host: reference-counted detach on
shared subsystems, adoption, crash recovery, heal of every attachment, status."""

import json
import os
import stat
import subprocess

import pytest

from nvmeof_mp import connection
from nvmeof_mp import registry as reg
from nvmeof_mp.exception import NVMeOFError, PrivilegedArgumentError
from nvmeof_mp.privileged import registry as store
from nvmeof_mp.sim import HOST_NQN

from simlab import NQN, P1, UUID, UUID2, conninfo

UUID3 = "3c3c3c3c-1b7e-4c2a-9a55-3f1e6c2b7d03"
SECRET = "DHHC-1:00:" + "A" * 44 + ":"


def shared(lab, namespaces=((1, UUID), (2, UUID2), (3, UUID3))):
    """One subsystem exporting several namespaces (Cinder's lvm_share_target)."""
    lab.target(namespaces=namespaces)


def vol(uuid, **extra):
    return conninfo(uuid=uuid, **extra)


def dead_owner():
    """The owner of a record whose process is gone."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return {"pid": proc.pid, "start": 0}


def files(lab, *parts):
    base = os.path.join(lab.root, store.STATE_DIR, *parts)
    return sorted(os.listdir(base)) if os.path.isdir(base) else []


# -- reference-counted detach ------------------------------------------------------------------

def test_two_volumes_of_a_shared_subsystem_leave_no_controller_when_both_are_detached(lab):
    shared(lab)
    lab.connector.connect_volume(vol(UUID))
    lab.connector.connect_volume(vol(UUID2))
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    lab.connector.disconnect_volume(vol(UUID), None)
    # the other volume of this host holds the subsystem: its paths stay
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    assert lab.connector.get_volume_paths(vol(UUID2))
    lab.connector.disconnect_volume(vol(UUID2), None)
    # the target still exports three namespaces, but no volume of this host uses them
    assert lab.sim.controllers(NQN) == []
    assert files(lab, "volumes") == [] and files(lab, "refs") == []


def test_a_volume_attached_by_another_process_keeps_its_paths(lab):
    shared(lab)
    other = lab.new_connector()          # another process: its own connector, same host
    other.connect_volume(vol(UUID2))
    lab.connector.connect_volume(vol(UUID))
    lab.connector.disconnect_volume(vol(UUID), None)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    other.disconnect_volume(vol(UUID2), None)
    assert lab.sim.controllers(NQN) == []


def test_controllers_that_predate_the_registry_are_adopted_conservatively(lab):
    """Connected by os-brick (or an older release): its volumes are unknown here, so while
    the subsystem shows another namespace, the controllers stay."""
    shared(lab)
    for port in (4420, 4421):
        lab.sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": str(port),
                         "transport": "tcp", "hostnqn": HOST_NQN})
    lab.sim.clock.sleep(1)
    lab.connector.connect_volume(vol(UUID))
    refs = [json.load(open(os.path.join(lab.root, store.STATE_DIR, "refs", d, f)))
            for d in files(lab, "refs") for f in files(lab, "refs", d)]
    assert [r["adopted"] for r in refs] == [True]
    lab.connector.disconnect_volume(vol(UUID), None)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]


def test_an_attached_volume_the_registry_did_not_know_is_adopted_on_attach(lab):
    shared(lab, namespaces=((1, UUID),))
    lab.connector.connect_volume(vol(UUID))
    for name in files(lab, "volumes"):          # as if attached by an older release
        lab.sim.registry_drop(json.load(open(os.path.join(
            lab.root, store.STATE_DIR, "volumes", name)))["key"])
    lab.connector.connect_volume(vol(UUID))
    [record] = lab.connector.attachments()
    assert record["state"] == "attached"
    lab.connector.disconnect_volume(vol(UUID), None)
    assert lab.sim.controllers(NQN) == []      # its only namespace: nothing else to keep


def test_the_daemon_keeps_controllers_another_volume_holds_whatever_the_caller_asks(lab):
    """The last check happens in the daemon, under the registry lock: a volume of another
    service (its own lock directory, its own daemon) that holds the subsystem first keeps
    its controllers even when the detaching process planned without it."""
    shared(lab)
    lab.connector.connect_volume(vol(UUID))
    lab.sim.registry_hold("ns:other", NQN, HOST_NQN, False, reg.owner())
    result = lab.sim.registry_release(connection.parse(vol(UUID)).volume_key, NQN, HOST_NQN,
                                      ["nvme0", "nvme1"], [])
    assert result["kept"] and result["deleted"] == []
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]


def test_a_busy_namespace_of_the_subsystem_keeps_the_controllers(lab, monkeypatch):
    shared(lab)
    lab.connector.connect_volume(vol(UUID))
    monkeypatch.setattr(lab.sim, "exclusive_busy",
                        lambda devices: {d: "open exclusively" for d in devices})
    lab.connector.disconnect_volume(vol(UUID), None)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]
    assert files(lab, "volumes") == []


# -- records -------------------------------------------------------------------------------------

def test_record_holds_no_secret_and_the_secrets_are_root_only(lab):
    lab.target(ports=(4420,))
    info = conninfo(portals=[P1], dhchap_secret=SECRET)
    lab.connector.connect_volume(info)
    [name] = files(lab, "volumes")
    text = open(os.path.join(lab.root, store.STATE_DIR, "volumes", name)).read()
    assert SECRET not in text and "dhchap_secret" not in text
    record = json.loads(text)
    assert record["state"] == "attached" and record["secrets"] is True
    assert record["created"]["controllers"] == ["nvme0"]
    secrets = os.path.join(lab.root, store.STATE_DIR, "secrets", name)
    assert json.load(open(secrets))["dhchap_secret"] == SECRET
    assert stat.S_IMODE(os.stat(secrets).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(secrets)).st_mode) == 0o700
    lab.connector.disconnect_volume(info, None)
    assert files(lab, "secrets") == []


def test_the_store_refuses_a_record_with_a_secret_and_names_files_itself(tmp_path):
    record = {"key": "ns:x", "state": "attached", "connection_info": {"dhchap_secret": SECRET}}
    with pytest.raises(PrivilegedArgumentError, match="secret"):
        store.put(str(tmp_path), "ns:x", record)
    with pytest.raises(PrivilegedArgumentError, match="another volume"):
        store.put(str(tmp_path), "ns:y", dict(record, connection_info={}))
    with pytest.raises(PrivilegedArgumentError, match="volume key"):
        store.put(str(tmp_path), "ns:\n", dict(record, key="ns:\n", connection_info={}))
    store.put(str(tmp_path), "../../etc/x", {"key": "../../etc/x", "state": "attached"})
    [name] = os.listdir(tmp_path / store.STATE_DIR / "volumes")
    assert name == store.key_name("../../etc/x") + ".json"


def test_records_of_an_earlier_boot_are_removed_at_first_use(lab):
    boot = os.path.join(lab.root, store.BOOT_ID)
    os.makedirs(os.path.dirname(boot), exist_ok=True)
    with open(boot, "w") as f:
        f.write("boot-1\n")
    lab.target(ports=(4420,))
    lab.connector.connect_volume(conninfo(portals=[P1]))
    assert len(files(lab, "volumes")) == 1
    assert len(lab.new_connector().attachments()) == 1   # another process, the same boot
    with open(boot, "w") as f:
        f.write("boot-2\n")
    fresh = lab.new_connector()       # a process started after the reboot
    assert fresh.attachments() == []
    assert files(lab, "volumes") == [] and files(lab, "refs") == []


def test_a_failed_attach_leaves_no_record(lab):
    lab.target(ports=(4420,))
    lab.sim.portal(NQN, 4420).mode = "refuse"
    with pytest.raises(NVMeOFError):
        lab.connector.connect_volume(conninfo(portals=[P1]))
    assert files(lab, "volumes") == [] and files(lab, "refs") == []


def test_a_refused_detach_leaves_the_volume_attached_in_the_registry(lab):
    lab.target(ports=(4420,))
    info = conninfo(portals=[P1])
    lab.connector.connect_volume(info)
    lab.sim.path_down(NQN, 4420)
    with pytest.raises(NVMeOFError, match="flush impossible"):
        lab.connector.disconnect_volume(info, None)
    [record] = lab.connector.attachments()
    assert record["state"] == "attached"
    assert "detach refused" in record["events"][-1][1]


# -- crash recovery ------------------------------------------------------------------------------

def crashed_attach(lab, info):
    """The state a process killed mid-attach leaves: controllers connected, the record
    'attaching', its owner gone."""
    request = connection.parse(info)
    rec, secrets = lab.connector.registry.record(request, info, reg.ATTACHING, event="attach")
    rec["owner"] = dead_owner()
    lab.sim.registry_hold(request.volume_key, NQN, HOST_NQN, False, rec["owner"], rec, secrets)
    for port in (4420, 4421):
        lab.sim.connect({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": str(port),
                         "transport": "tcp", "hostnqn": HOST_NQN})
    lab.sim.clock.sleep(1)
    return request


def test_an_attach_interrupted_by_a_crash_is_rolled_back_by_the_next_call_on_its_subsystem(
        lab):
    shared(lab)
    crashed_attach(lab, vol(UUID))
    lab.connector.connect_volume(vol(UUID2))
    assert [r["describe"] for r in lab.connector.attachments()] == [
        connection.parse(vol(UUID2)).describe()]
    lab.connector.disconnect_volume(vol(UUID2), None)
    assert lab.sim.controllers(NQN) == []


def test_heal_all_rolls_back_an_interrupted_attach(lab):
    shared(lab)
    crashed_attach(lab, vol(UUID))
    [entry] = lab.connector.heal_all()
    assert entry["action"].startswith("attach rolled back")
    assert lab.sim.controllers(NQN) == [] and files(lab, "volumes") == []


def test_an_interrupted_attach_is_finished_by_the_next_attach_of_that_volume(lab):
    shared(lab)
    crashed_attach(lab, vol(UUID))
    result = lab.connector.connect_volume(vol(UUID))
    [record] = lab.connector.attachments()
    assert record["state"] == "attached" and record["device"] == result["path"]
    assert not record["interrupted"]


def test_heal_all_finishes_an_interrupted_detach(lab):
    shared(lab, namespaces=((1, UUID),))
    lab.connector.connect_volume(vol(UUID))
    key = connection.parse(vol(UUID)).volume_key
    lab.connector.registry.event(key, "detach", state=reg.DETACHING, owner=dead_owner())
    assert lab.connector.attachments()[0]["interrupted"]
    [entry] = lab.connector.heal_all()
    assert entry["action"] == "detach finished"
    assert lab.sim.controllers(NQN) == [] and files(lab, "volumes") == []


def test_an_attach_in_progress_in_a_live_process_is_left_alone(lab):
    shared(lab)
    request = connection.parse(vol(UUID))
    rec, _ = lab.connector.registry.record(request, vol(UUID), reg.ATTACHING)
    lab.sim.registry_hold(request.volume_key, NQN, HOST_NQN, False, reg.owner(), rec)
    [entry] = lab.connector.heal_all()
    assert entry["action"] == "skipped: attaching in progress"
    assert len(files(lab, "volumes")) == 1


# -- heal without a caller -------------------------------------------------------------------------

def test_heal_all_reconnects_a_volume_whose_controllers_the_kernel_deleted(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    for name in lab.sim.controllers(NQN):
        lab.sim.expire(name)           # ctrl_loss_tmo ran out: no device left at all
    assert lab.connector.get_volume_paths(conninfo()) == []
    [entry] = lab.connector.heal_all()
    assert entry["action"] == "healed" and entry["verdicts"] == ["healthy"]
    assert lab.connector.get_volume_paths(conninfo()) == ["/dev/nvme0n1"]
    assert "heal: down -> healthy" in [e[1] for e in lab.connector.attachments()[0]["events"]]


def test_heal_all_skips_an_authenticated_volume_it_cannot_read_the_secrets_of(lab,
                                                                                monkeypatch):
    lab.target(ports=(4420,))
    info = conninfo(portals=[P1], dhchap_secret=SECRET)
    lab.connector.connect_volume(info)
    monkeypatch.setattr(lab.connector.registry, "secret_info", lambda key: None)
    [entry] = lab.connector.heal_all()
    assert "root only" in entry["action"]


def test_status_lists_each_attachment_with_its_paths(lab):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4421)
    [entry] = lab.connector.attachments()
    assert entry["state"] == "attached" and entry["device"] == "/dev/nvme0n1"
    assert entry["targets"][0]["verdict"] == "degraded"
    assert [e[1] for e in entry["events"]] == ["attach", "attached"]
    json.dumps(entry)


def test_unregistered_detach_keeps_old_behaviour(lab):
    """A volume attached by an older release (no record) detaches as before: the
    controllers go only when the subsystem shows no other namespace."""
    shared(lab, namespaces=((1, UUID), (2, UUID2)))
    lab.connector.connect_volume(vol(UUID))
    for name in files(lab, "volumes"):
        lab.sim.registry_drop(json.load(open(os.path.join(
            lab.root, store.STATE_DIR, "volumes", name)))["key"])
    lab.connector.disconnect_volume(vol(UUID), None)
    assert lab.sim.controllers(NQN) == ["nvme0", "nvme1"]


def test_raid_volume_holds_both_leg_subsystems_and_releases_them(lab):
    from test_replicated import NQA, NQB, raid_info
    lab.target(nqn=NQA, ports=(4420, 4422), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421, 4423), namespaces=((1, UUID2),))
    lab.connector.connect_volume(raid_info())
    [record] = lab.connector.attachments()
    assert record["mode"] == "raid" and record["created"]["raid"] == "/dev/md/vol1"
    assert len(record["created"]["controllers"]) == 2
    assert len(files(lab, "refs")) == 2
    lab.connector.disconnect_volume(raid_info(), None)
    assert files(lab, "refs") == [] and files(lab, "volumes") == []
    assert lab.sim.controllers() == []


@pytest.mark.skipif(os.getuid() != 0, reason="root's heal in a service's lock directory")
def test_root_heal_takes_the_volume_lock_where_the_attaching_service_takes_it(lab, tmp_path):
    from nvmeof_mp import locks
    service_dir = tmp_path / "nova-locks"
    service_dir.mkdir(mode=0o755)
    lab.target()
    nova = lab.new_connector(lock_path=str(service_dir))
    nova.connect_volume(conninfo())
    for name in os.listdir(service_dir):
        os.unlink(service_dir / name)            # a temp cleaner passed
    os.chown(service_dir, 4242, 4242)             # the service user's lock_path
    timer = lab.new_connector(lock_path=str(tmp_path / "root-locks"))
    [entry] = timer.heal_all()
    assert entry["action"] == "checked"
    key = connection.parse(conninfo()).volume_key
    lock = locks.lock_file("vol", key, str(service_dir))
    assert os.stat(lock).st_uid == 4242          # the service can still open its lock
    assert not os.path.exists(locks.lock_file("vol", key, str(tmp_path / "root-locks")))


def test_heal_all_re_adds_a_failed_raid_leg_and_says_so(lab):
    from test_replicated import NQA, NQB, raid_info
    lab.target(nqn=NQA, ports=(4420, 4422), namespaces=((1, UUID),))
    lab.target(nqn=NQB, ports=(4421, 4423), namespaces=((1, UUID2),))
    lab.connector.connect_volume(raid_info())
    lab.sim.md_fail("vol1", "/dev/nvme1n1")
    [entry] = lab.connector.heal_all()
    assert entry["action"] == "healed"
    assert lab.sim.md["vol1"]["legs"]["/dev/nvme1n1"] == "active"
    assert "md legs re-added: /dev/nvme1n1" in lab.connector.attachments()[0]["events"][-1][1]
    lab.connector.disconnect_volume(raid_info(), None)


def test_root_heals_an_authenticated_volume_with_its_stored_secret(lab):
    lab.target(ports=(4420,))
    lab.sim.secrets[NQN] = SECRET                  # the target authenticates the host
    info = conninfo(portals=[P1], dhchap_secret=SECRET)
    lab.connector.connect_volume(info)
    for name in lab.sim.controllers(NQN):
        lab.sim.expire(name)
    [entry] = lab.new_connector().heal_all()       # the timer: knows only the registry
    assert entry["action"] == "healed" and entry["verdicts"] == ["healthy"]
    lab.connector.disconnect_volume(info, None)


def test_an_attach_whose_device_never_shows_leaves_no_record(lab):
    """The attached record is written while the attach waits for the device; when the device
    never comes, the attach is undone and its record goes too."""
    lab.target(namespaces=())
    with pytest.raises(NVMeOFError):
        lab.connector.connect_volume(conninfo())
    assert lab.sim.controllers(NQN) == []
    assert files(lab, "volumes") == [] and files(lab, "refs") == []


def test_releases_of_different_subsystems_delete_in_parallel(tmp_path):
    """Deleting a controller waits for the kernel (tens of ms each): the registry's check
    and the deletes of one subsystem must not hold back another subsystem's (eight volumes
    detached at once took 1.85x the floor with one lock for all)."""
    import threading
    both = threading.Barrier(2, timeout=5)

    def delete(name):
        both.wait()          # each delete waits until the other subsystem's is running too
        return None
    results = {}

    def release(nqn):
        store.hold(str(tmp_path), "ns:" + nqn, nqn, HOST_NQN, False, {})
        results[nqn] = store.release(str(tmp_path), "ns:" + nqn, nqn, HOST_NQN, ["nvme0"], [],
                                     delete, lambda d: {})
    workers = [threading.Thread(target=release, args=(NQN + s,)) for s in ("-a", "-b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [r["deleted"] for r in results.values()] == [["nvme0"], ["nvme0"]]


def test_root_heal_never_makes_lock_files_in_a_system_directory_a_record_names(lab, tmp_path):
    system_dir = tmp_path / "etc"
    system_dir.mkdir(mode=0o755)            # owned by root, as /etc is
    lab.target()
    lab.connector.connect_volume(conninfo())
    key = connection.parse(conninfo()).volume_key
    record = lab.connector.registry.get(key)
    record["lock_path"] = str(system_dir)
    lab.sim.registry_put(key, record)
    timer = lab.new_connector(lock_path=str(tmp_path / "root-locks"))
    assert timer.lock_path_of(record) == timer.lock_path
    timer.heal_all()
    assert os.listdir(system_dir) == []


def test_heal_of_a_volume_whose_attach_crashed_says_what_it_did(lab, tmp_path, monkeypatch,
                                                                  capsys):
    """``nvmeof-mp heal CONNINFO`` rolls back the crashed attach and says so (it used to
    print "not attached: nothing to heal" after undoing it)."""
    from nvmeof_mp import cli
    shared(lab)
    crashed_attach(lab, vol(UUID))
    path = tmp_path / "conn.json"
    path.write_text(json.dumps(vol(UUID)))
    monkeypatch.setattr(cli, "_connector", lambda args: lab.connector)
    assert cli.main(["heal", str(path)]) == 1          # rolled back: not attached now
    out = capsys.readouterr().out
    assert "attach rolled back" in out and "nothing to heal" not in out, out
    assert lab.sim.controllers(NQN) == [] and files(lab, "volumes") == []

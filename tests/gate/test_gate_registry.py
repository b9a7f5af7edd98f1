"""The host knows what it attached (runs in the lab VM, real kernel, real privsep daemon).

- two volumes of one subsystem attached and both detached while the target still exports
  both: no controller left (reference counting, not "the subsystem shows no namespace");
- a namespace of that subsystem attached by another process, mounted by hand, or held open
  exclusively keeps its paths;
- a process killed in the middle of an attach or a detach: the next call on the subsystem or
  ``nvmeof-mp heal --all`` leaves a consistent host;
- ``nvmeof-mp status`` shows each step.
"""

import json
import os
import subprocess
import sys

import pytest
from test_gate import U1, U2, controllers, info, one_subsystem
from test_gate_safety import finish_worker, start_worker, who

from nvmeof_mp.lab.workload import Writer, verify, wait_for

pytestmark = pytest.mark.usefixtures("no_leftovers")

U3 = "5e5e5e5e-0a0b-4c0d-8e0f-101112131415"
CLI_TIMEOUT = 120


def shared_subsystem(target, uuids=(U1, U2)):
    one_subsystem(target, namespaces=tuple(enumerate(uuids, start=1)))


def cli(*args, check=True):
    """``nvmeof-mp`` as an operator runs it: the lab user with the root helper, root without."""
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    if os.getuid() == 0:
        env.pop("NVMEOF_MP_ROOT_HELPER", None)
    proc = subprocess.run([sys.executable, "-m", "nvmeof_mp.cli", *args], env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT)
    if check and proc.returncode not in (0, 1):
        pytest.fail("nvmeof-mp %s: exit %d\n%s" % (" ".join(args), proc.returncode,
                                                     proc.stderr[-3000:]))
    return proc


def status():
    return json.loads(cli("--json", "status").stdout)


def conninfo_file(tmp_path, data, name="conn.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o644)
    return str(path)


def io_works(device):
    w = Writer(device)
    w.start()
    wrote = wait_for(lambda: w.ops > 20, 10)     # no write done: nothing to verify, no proof
    w.stop()
    return bool(wrote) and not w.errors and verify(device, w.expected) == []


@pytest.mark.cover("shared subsystem: last volume takes the controllers", mode="native")
@pytest.mark.root_too
def test_registry_shared_subsystem_last_volume_takes_the_controllers(connector, target):
    shared_subsystem(target, (U1, U2, U3))
    first = connector.connect_volume(info(U1))
    second = connector.connect_volume(info(U2))
    ctrls = controllers()
    connector.disconnect_volume(info(U1), first)
    assert controllers() == ctrls, "the other volume's paths went away"
    assert io_works(second["path"])
    connector.disconnect_volume(info(U2), second)
    # the target still exports three namespaces; none is used by this host
    assert controllers() == {}
    assert status() == []


@pytest.mark.cover("shared subsystem: another process's volume keeps its paths", mode="native")
@pytest.mark.root_too
def test_registry_volume_of_another_process_keeps_its_paths(connector, target, tmp_path):
    shared_subsystem(target)
    path = conninfo_file(tmp_path, info(U2))
    other = cli("--json", "connect", path)
    device = json.loads(other.stdout)["path"]
    assert [e["state"] for e in status()] == ["attached"]
    result = connector.connect_volume(info(U1))
    connector.disconnect_volume(info(U1), result)
    assert controllers(), "detach took the paths of the other process's volume"
    assert io_works(device)
    cli("disconnect", path)
    assert controllers() == {}
    assert status() == []


@pytest.mark.cover("shared subsystem: a namespace in use keeps the paths", mode="native")
@pytest.mark.parametrize("how", ["mounted", "held"])
def test_registry_namespace_in_use_by_something_else_keeps_its_paths(connector, target, how):
    """Another namespace of the subsystem, which this host's registry does not know, is
    mounted by hand, or open exclusively by another tool (no holder, no mount: only the
    daemon's exclusive open sees it)."""
    shared_subsystem(target)
    result = connector.connect_volume(info(U1))
    other = wait_for(lambda: next((s["device"] for s in connector.get_path_status(info(U2))
                                   if s["device"]), None), 20)
    assert other, "the subsystem's second namespace did not show up"
    if how == "mounted":
        target.mount_scratch(other)
    else:
        target.hold_exclusive(other)
    try:
        connector.disconnect_volume(info(U1), result)
        assert controllers(), "detach took the paths of a namespace in use (%s)" % how
        assert status() == []
    finally:
        target.umount_scratch()
        target.release_exclusive()
    target.cleanup_initiator()      # nobody holds them now: an operator removes them


@pytest.mark.cover("process killed mid-attach: rolled back", mode="native")
@pytest.mark.root_too
def test_registry_process_killed_mid_attach_is_rolled_back_by_the_next_attach(connector,
                                                                             target):
    shared_subsystem(target)
    worker = start_worker("dies_at", {"info": info(U1), "phase": "attach"})
    finish_worker_killed(worker)
    [entry] = status()
    assert entry["state"] == "attaching" and entry["interrupted"], entry
    assert controllers()
    result = connector.connect_volume(info(U2))      # a call on the same subsystem
    assert [e["describe"] for e in status()] == [entry["describe"].replace(U1, U2)]
    connector.disconnect_volume(info(U2), result)
    assert controllers() == {}


@pytest.mark.cover("process killed mid-attach / mid-detach: heal --all", mode="native")
@pytest.mark.parametrize("phase", ["attach", "detach"])
def test_registry_process_killed_mid_call_heal_all_leaves_a_consistent_host(target, phase):
    shared_subsystem(target)
    worker = start_worker("dies_at", {"info": info(U1), "phase": phase})
    finish_worker_killed(worker)
    [entry] = status()
    assert entry["state"] == phase + "ing" and entry["interrupted"], entry
    healed = json.loads(cli("--json", "heal", "--all").stdout)
    assert [e["action"].split(" (")[0] for e in healed] == [
        "attach rolled back" if phase == "attach" else "detach finished"], healed
    assert controllers() == {}
    assert status() == []


def finish_worker_killed(worker):
    try:
        out, err = worker.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        finish_worker(worker, 1)
    assert worker.returncode == -9, "the worker was to die by SIGKILL (%s): %s" % (
        who(), err[-2000:])

"""Attach safety against the real kernel (runs in the lab VM): single-path failover at attach
time, timeouts of new controllers, per-volume host NQNs."""

import os
import time

import pytest

from nvmeof_mp.lab.workload import Writer, verify, wait_for

from test_gate import NQN, U2, controllers, info, one_subsystem, record

pytestmark = pytest.mark.usefixtures("no_leftovers")
HELPER = NQN + "-helper"


def single_path_connector(**kwargs):
    from nvmeof_mp.connector import NVMeOFConnector
    return NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                           use_multipath=False, **kwargs)


def sysfs(ctrl, attr):
    with open("/sys/class/nvme/%s/%s" % (ctrl, attr)) as f:
        return f.read().strip()


@pytest.mark.cover("attach with a portal down")
def test_single_path_with_its_only_controller_connecting_uses_the_next_portal(target):
    single = single_path_connector()
    one_subsystem(target)
    first = single.connect_volume(info())
    [ctrl] = controllers()
    assert sysfs(ctrl, "ctrl_loss_tmo") == "off"         # the default: reconnect forever
    target.unlink(1, NQN)                                # the only path's port goes away
    assert wait_for(lambda: controllers() == {ctrl: "connecting"}, 20)
    # Linux nvmet hands out the lowest free controller ID (one pool for all subsystems): the
    # next controller of this subsystem would get the ID of the one reconnecting, and the host
    # kernel rejects that ("Duplicate cntlid", EINVAL).  Arrays with other controllers open
    # hand out other IDs; a controller of another subsystem makes the lab do the same.
    one_subsystem(target, nqn=HELPER, ports=((2, 4421),), namespaces=((1, U2),))
    helper = single.connect_volume(info(uuid=U2, nqn=HELPER, ports=(4421,)))
    start = time.monotonic()
    again = single.connect_volume(info())
    took = time.monotonic() - start
    record("single path, only controller connecting: attach via the next portal %.3fs" % took)
    assert took < single.policy.device_timeout / 2       # no wait for the attach timeout
    states = {p["portal"]: p["state"] for p in again["paths"]}
    assert states["tcp://127.0.0.1:4421"] == "live"
    w = Writer(again["path"])
    w.start()
    time.sleep(0.5)
    w.stop()
    assert not w.errors and w.ops > 0 and verify(again["path"], w.expected) == []
    target.link(1, NQN)
    assert wait_for(lambda: set(controllers().values()) == {"live"}, 30)
    assert first["path"] and single.get_volume_paths(info())
    single.disconnect_volume(info(), again)
    single.disconnect_volume(info(uuid=U2, nqn=HELPER, ports=(4421,)), helper)


@pytest.mark.cover("per-volume host NQN")
def test_per_volume_host_nqn_connects_with_its_own_host_id(connector, target):
    host_nqn = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-4333-8444-555555555555"
    one_subsystem(target, ports=((1, 4420),))
    vol = dict(info(ports=(4420,)), host_nqn=host_nqn)
    result = connector.connect_volume(vol)
    [ctrl] = controllers()
    assert sysfs(ctrl, "hostnqn") == host_nqn
    assert sysfs(ctrl, "hostid") == "11111111-2222-4333-8444-555555555555"
    connector.disconnect_volume(vol, result)

"""Issue 13 on the real kernel: what Cinder sends is attached, what is not ours is not touched.

- the NQNs Cinder's nvmet target helper gives (connection information v1 and v2);
- the daemon asked to act on a dm map that is not ours, or to build one over a device that is
  not an NVMe-oF namespace: refused, the map untouched (root pass: making a foreign map needs
  root);
- the daemon asked to stop, grow or create md arrays that are not ours, or over legs that are
  not NVMe-oF namespaces: refused, the array untouched (root pass);
- the sudoers rule lets the lab user start this privsep context through ``helper_command`` and
  no other context (root pass: it installs the rule, then acts as the lab user).
"""

import json
import os
import subprocess
import sys
import time

import pytest
from test_gate import info, one_subsystem

from nvmeof_mp.lab.workload import Writer, verify

pytestmark = pytest.mark.usefixtures("no_leftovers")

VOL = "5f0c3b7e-7a55-4b8e-9d0c-2b1f6a4e8c31"
CINDER_NQNS = ["nqn.nvme-subsystem-1-" + VOL, "nqn.iqn.2010-10.org.openstack:-" + VOL]
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="makes objects only root can make")


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def write_and_verify(path):
    w = Writer(path)
    w.start()
    time.sleep(0.5)
    w.stop()
    assert not w.errors and w.ops > 0 and verify(path, w.expected) == []


@pytest.mark.cover("Cinder nvmet connection info (old and new format)")
@pytest.mark.root_too
@pytest.mark.parametrize("nqn", CINDER_NQNS)
@pytest.mark.parametrize("version", [1, 2])
def test_cinder_nvmet_connection_info_attaches(connector, target, nqn, version):
    one_subsystem(target, nqn=nqn, ports=((1, 4420),), namespaces=((10, VOL),))
    if version == 1:        # nvmeof_conn_info_version 1: old keys, integer port, ns_id
        conn = {"target_portal": "127.0.0.1", "target_port": 4420, "nqn": nqn,
                "transport_type": "tcp", "ns_id": 10, "volume_nguid": None}
    else:                   # version 2: string port and ns_id
        conn = dict(info(VOL, nqn, (4420,)), ns_id="10")
    result = connector.connect_volume(conn)
    write_and_verify(result["path"])
    connector.disconnect_volume(conn, result)


@pytest.fixture
def foreign_map():
    """A dm map that is not ours (no nvmeof_mp- uuid), as LVM or dm-crypt would make."""
    name = "gate-foreign"
    out = run("dmsetup", "create", name, "--table", "0 8192 zero")
    assert out.returncode == 0, out.stderr
    yield name
    run("dmsetup", "remove", name)


@pytest.mark.cover("privilege boundary: foreign objects refused", mode="dm")
@pytest.mark.root_too
@needs_root
def test_the_daemon_leaves_a_foreign_dm_map_alone(connector, target, foreign_map):
    one_subsystem(target, ports=((1, 4420),))
    result = connector.connect_volume(info(ports=(4420,)))
    with open("/sys/class/block/%s/dev" % os.path.basename(result["path"])) as f:
        ours = f.read().strip()
    with open("/sys/class/block/%s/dev" % os.path.basename(
            os.path.realpath("/dev/mapper/" + foreign_map))) as f:
        foreign_dev = f.read().strip()
    kernel = connector.kernel
    try:
        for act in (lambda: kernel.dm_reload(foreign_map, 8192, [ours]),
                    lambda: kernel.dm_create(foreign_map, 8192, [ours]),
                    lambda: kernel.dm_message(foreign_map, "fail_if_no_path"),
                    lambda: kernel.dm_status(foreign_map),
                    lambda: kernel.dm_remove(foreign_map),
                    lambda: kernel.dm_create("gate-new", 8192, [foreign_dev])):
            with pytest.raises(Exception, match="not one of nvmeof_mp's|not an NVMe"):
                act()
        assert run("dmsetup", "table", foreign_map).stdout.split()[:3] == ["0", "8192", "zero"]
        assert run("dmsetup", "info", "gate-new").returncode != 0
    finally:
        connector.disconnect_volume(info(ports=(4420,)), result)


@pytest.fixture
def foreign_array(tmp_path):
    """An md RAID1 that is not ours (no marker), over two loop devices."""
    loops = []
    for i in range(2):
        backing = tmp_path / ("leg%d" % i)
        backing.write_bytes(b"\0" * (16 << 20))
        loops.append(run("losetup", "-f", "--show", str(backing)).stdout.strip())
    out = run("mdadm", "--create", "/dev/md/gate-foreign", "--run", "--level=1",
              "--raid-devices=2", "--metadata=1.2", *loops)
    assert out.returncode == 0, out.stderr
    yield "gate-foreign", loops
    run("mdadm", "--stop", "/dev/md/gate-foreign")
    for loop in loops:
        run("mdadm", "--zero-superblock", loop)
        run("losetup", "-d", loop)


@pytest.mark.cover("privilege boundary: foreign objects refused", mode="raid")
@pytest.mark.root_too
@needs_root
def test_the_daemon_leaves_a_foreign_md_array_and_other_devices_alone(connector,
                                                                       foreign_array):
    name, loops = foreign_array
    kernel = connector.kernel
    for refused in (kernel.md_stop(name), kernel.md_grow(name)):
        assert refused["ok"] is False and "not ours" in refused["error"]    # its members
    for act in (lambda: kernel.md_create("gate-new", loops, 2),
                lambda: kernel.md_examine(loops[0]),
                lambda: kernel.md_assemble(name, loops),
                lambda: kernel.md_stop_inactive(name, loops),
                lambda: kernel.md_re_add(name, loops[0])):
        with pytest.raises(Exception, match="not an NVMe namespace"):
            act()
    state = open("/sys/block/%s/md/array_state" % os.path.basename(
        os.path.realpath("/dev/md/" + name))).read().strip()
    assert state in ("clean", "active", "active-idle")
    assert not os.path.exists("/dev/md/gate-new")


SUDOERS = "/etc/sudoers.d/nvmeof_mp"
PRIVSEP_CONTEXT = "nvmeof_mp.privileged.default"
USER_ATTACH = r"""
import json, os, sys
from oslo_config import cfg
from nvmeof_mp.connector import NVMeOFConnector
conn = NVMeOFConnector(root_helper="sudo -n", use_multipath=True)
cfg.CONF.set_override("helper_command", "sudo -n " + sys.argv[1], group="nvmeof_mp_privileged")
info = json.loads(sys.argv[2])
result = conn.connect_volume(info)
with open(result["path"], "rb") as f:
    f.read(4096)
conn.disconnect_volume(info, result)
print("OK")
"""


@pytest.mark.cover("privilege boundary: sudoers and rootwrap")
@pytest.mark.root_too
@needs_root
def test_the_sudoers_rule_starts_our_context_and_no_other(target, tmp_path):
    from nvmeof_mp.lab import LAB_USER
    helper = os.path.join(os.path.dirname(sys.executable), "privsep-helper")
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "..", "etc", "sudoers.d", "nvmeof_mp")) as f:
        rule = f.read().replace("/usr/local/bin/privsep-helper", helper)
    rule = rule.replace("\nnova ALL", "\n%s ALL" % LAB_USER)
    with open(SUDOERS, "w") as f:
        f.write(rule)
    os.chmod(SUDOERS, 0o440)
    try:
        assert run("visudo", "-cf", SUDOERS).returncode == 0
        as_user = ["runuser", "-u", LAB_USER, "--"]
        # Both with a socket path where nobody listens: privsep-helper started as root exits
        # non-zero by itself, so only sudo's own refusal tells "not allowed" from "ran".
        refused = "a password is required"     # sudo -n: no rule lets it run, nobody to ask
        sock = ("--privsep_sock_path", "/tmp/x/privsep.sock")
        other = run(*as_user, "sudo", "-n", helper, "--privsep_context",
                    "os_brick.privileged.default", *sock)
        assert other.returncode != 0 and refused in other.stderr, other.stderr[-2000:]
        ours = run(*as_user, "sudo", "-n", helper, "--privsep_context", PRIVSEP_CONTEXT, *sock)
        assert refused not in ours.stderr, ours.stderr[-2000:]
        one_subsystem(target, ports=((1, 4420),))
        out = subprocess.run(as_user + [sys.executable, "-c", USER_ATTACH, helper,
                                        json.dumps(info(ports=(4420,)))],
                             capture_output=True, text=True, timeout=180)
        assert out.stdout.strip().endswith("OK"), out.stderr[-3000:]
    finally:
        os.unlink(SUDOERS)

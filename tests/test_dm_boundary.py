"""The daemon's dm entrypoints act only on maps whose DM uuid carries our prefix.

Their bodies run in-process against a fake ``dmsetup`` that knows two maps: ours and an LVM
volume's; every command it is given is logged, so a refusal is seen as "nothing ran".
"""

import stat

import pytest

from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import dmsetup as dm, host

from simlab import fabrics_host

OURS = "3c1b2a9e-77d4-4e0b-8f6a-0c9d2e4b5a11"
LVM = "vg0-root"

FAKE = r"""#!/bin/sh
echo "$@" >> "%(log)s"
name=""
for a in "$@"; do name="$a"; done
case "$1" in
  info)
    case "$name" in
      %(ours)s) [ "$2" = "-c" ] && echo "nvmeof_mp-%(ours)s"; exit 0 ;;
      %(lvm)s) [ "$2" = "-c" ] && echo "LVM-Xq3bI0yJbQ9cLJ0uTq7iK2X0hY8o2n"; exit 0 ;;
      *) echo "Device does not exist." >&2; exit 1 ;;
    esac ;;
  status) echo "0 131072 multipath 2 0 0 0 1 1 A 0 1 2 259:0 A 0 0 1" ;;
esac
exit 0
"""


@pytest.fixture
def fabrics(tmp_path, monkeypatch):
    """A host whose 259:0 and 259:1 are NVMe-oF namespaces (the daemon reads its sysfs)."""
    sim = fabrics_host(str(tmp_path / "host"))
    monkeypatch.setattr(host, "SYS", sim.sys)
    return sim


@pytest.fixture
def dmsetup(tmp_path, monkeypatch, fabrics):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "dmsetup.log"
    script = bindir / "dmsetup"
    script.write_text(FAKE % {"log": log, "ours": OURS, "lvm": LVM})
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir))

    def commands():
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if not line.startswith("info")]
    return commands


@pytest.mark.parametrize("act", [
    lambda name: dm.create_map(name, 131072, ["259:0", "259:1"]),
    lambda name: dm.reload_map(name, 131072, ["259:0", "259:1"]),
    lambda name: dm.message_map(name, "fail_if_no_path"),
    lambda name: dm.message_map(name, "reinstate_path", "259:0"),
    lambda name: dm.map_status(name),
    lambda name: dm.remove_map(name),
])
def test_a_map_that_is_not_ours_is_never_touched(dmsetup, act):
    with pytest.raises(PrivilegedArgumentError, match="not one of nvmeof_mp's"):
        act(LVM)
    assert dmsetup() == []


def test_a_map_is_built_over_nvme_of_namespaces_only(dmsetup, fabrics, tmp_path):
    """A local disk (or a PCIe namespace, an LVM volume) never becomes a path of our map."""
    disk = tmp_path / "host" / "sys" / "devices" / "pci0000:00" / "sda"
    disk.mkdir(parents=True)
    (tmp_path / "host" / "sys" / "dev" / "block" / "8:0").symlink_to(disk)
    for paths in (["259:0", "8:0"], ["259:0", "259:77"]):
        with pytest.raises(PrivilegedArgumentError, match="not an NVMe"):
            dm.reload_map(OURS, 131072, paths)
        with pytest.raises(PrivilegedArgumentError, match="not an NVMe"):
            dm.create_map("new", 131072, paths)
    assert dmsetup() == []


def test_our_map_is_reloaded_queried_and_removed(dmsetup):
    assert not dm.create_map(OURS, 131072, ["259:0", "259:1"])["ok"]   # exists
    assert dm.reload_map(OURS, 131072, ["259:0", "259:1"])["ok"]
    assert dm.map_status(OURS) == {"259:0": "A"}
    assert dm.remove_map(OURS)["ok"]
    verbs = [line.split()[0] for line in dmsetup()]
    assert verbs == ["reload", "resume", "mknodes", "status", "message", "remove"]


def test_a_missing_map_is_created_with_our_uuid_and_nothing_else_runs_on_it(dmsetup):
    name = "0b7b1c2d-3e4f-4a5b-8c6d-7e8f90a1b2c3"
    assert dm.map_status(name) is None
    assert dm.remove_map(name)["ok"] is False
    assert dm.message_map(name, "fail_if_no_path")["ok"] is False
    assert dm.reload_map(name, 131072, ["259:0"])["ok"] is False      # no such map
    assert dm.create_map(name, 131072, ["259:0"])["ok"]
    created = [line for line in dmsetup() if line.startswith("create")]
    assert created and "--uuid nvmeof_mp-" + name in created[0]
    assert [line.split()[0] for line in dmsetup()] == ["create", "mknodes"]

"""Issue 14 on the real kernel: what the connector sees as "in use on this host".

One attached namespace is used in each way the detach must respect (open with O_EXCL by a
process, a dm map stacked on it, a filesystem mounted from it, a partition held by a dm map,
swap on a partition); each time ``inuse.in_use`` (reads as the caller) and the daemon's
``exclusive_busy`` (an exclusive open as root) must say so, and both must say nothing once
the use has ended.  Root pass only: mounting, dmsetup and swapon need root.
"""

import os
import struct
import subprocess
import tempfile

import pytest
from test_gate import info, one_subsystem

from nvmeof_mp import inuse

pytestmark = [pytest.mark.usefixtures("no_leftovers"), pytest.mark.root_too,
              pytest.mark.skipif(os.getuid() != 0, reason="mounts, maps and swaps need root")]

BUSY = "open exclusively or held by another user"


def run(*argv):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (argv, out.stderr)
    return out.stdout


def sysfs(name, attr):
    with open("/sys/class/block/%s/%s" % (name, attr)) as f:
        return f.read().strip()


def one_partition(device, name):
    """Write an MBR with one Linux partition (from 1 MiB on) and have the kernel read it."""
    lbs = int(run("blockdev", "--getss", device))
    blocks = int(run("blockdev", "--getsize64", device)) // lbs
    start = (1 << 20) // lbs
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, blocks - start)
    mbr = bytearray(512)
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, bytes(mbr))
        os.fsync(fd)
    finally:
        os.close(fd)
    run("blockdev", "--rereadpt", device)
    return name + "p1"


def wipe(device):
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, bytes(4096))
        os.fsync(fd)
    finally:
        os.close(fd)
    run("blockdev", "--rereadpt", device)


def linear_map(name, over):
    """A dm linear map named ``name`` over block device ``over`` (as LVM would make)."""
    size = int(sysfs(over, "size"))
    run("dmsetup", "create", name, "--table", "0 %d linear %s 0" % (size, sysfs(over, "dev")))
    return os.path.basename(os.path.realpath("/dev/mapper/" + name))


@pytest.mark.cover("namespace in use (mount, holder, swap, O_EXCL) seen")
def test_a_namespace_in_use_is_seen_by_reads_and_by_the_exclusive_open(connector, target):
    one_subsystem(target, ports=((1, 4420),))
    result = connector.connect_volume(info(ports=(4420,)))
    device = result["path"]
    name = os.path.basename(os.path.realpath(device))
    kernel = connector.kernel
    mnt = tempfile.mkdtemp(prefix="gate-inuse-")
    try:
        assert inuse.in_use("/", [name]) == {}
        assert kernel.exclusive_busy([device]) == {}

        fd = os.open(device, os.O_RDONLY | os.O_EXCL)       # a process holds it
        try:
            assert kernel.exclusive_busy([device]) == {device: BUSY}
            assert inuse.in_use("/", [name]) == {}           # no read shows that
        finally:
            os.close(fd)
        fd = os.open(device, os.O_RDONLY)                    # a plain open is no claim
        try:
            assert kernel.exclusive_busy([device]) == {}
        finally:
            os.close(fd)

        dm = linear_map("gate-inuse", name)
        try:
            assert inuse.in_use("/", [name]) == {name: "held by " + dm}
            assert kernel.exclusive_busy([device]) == {device: BUSY}
        finally:
            run("dmsetup", "remove", "gate-inuse")
        assert inuse.in_use("/", [name]) == {} and kernel.exclusive_busy([device]) == {}

        run("mkfs.ext4", "-q", "-F", device)
        run("mount", device, mnt)
        try:
            assert inuse.in_use("/", [name]) == {name: "mounted at " + mnt}
            assert kernel.exclusive_busy([device]) == {device: BUSY}
        finally:
            run("umount", mnt)
        assert inuse.in_use("/", [name]) == {} and kernel.exclusive_busy([device]) == {}

        wipe(device)
        part = one_partition(device, name)
        assert os.path.exists("/sys/class/block/%s/%s/partition" % (name, part))
        assert inuse.in_use("/", [name]) == {}
        assert kernel.exclusive_busy([device]) == {}
        dm = linear_map("gate-inuse", part)
        try:
            assert inuse.in_use("/", [name]) == {name: "partition %s held by %s" % (part, dm)}
            # a claimed partition claims its whole disk: the open of the disk fails
            assert kernel.exclusive_busy([device]) == {device: BUSY}
        finally:
            run("dmsetup", "remove", "gate-inuse")
        run("mkswap", "/dev/" + part)
        run("swapon", "/dev/" + part)
        try:
            assert inuse.in_use("/", [name]) == {name: "partition %s used as swap" % part}
            assert kernel.exclusive_busy([device]) == {device: BUSY}
        finally:
            run("swapoff", "/dev/" + part)
        assert inuse.in_use("/", [name]) == {} and kernel.exclusive_busy([device]) == {}
        wipe(device)
    finally:
        os.rmdir(mnt)
        connector.disconnect_volume(info(ports=(4420,)), result)

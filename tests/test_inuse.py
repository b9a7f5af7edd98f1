"""Is a namespace in use on this host?  ``inuse.in_use`` reads sysfs and /proc under a root;
the daemon's ``exclusive_busy`` tries an exclusive open of each namespace, bounded in time.

The client-side reads run against the simulated host's tree (its helpers put a namespace in
use the way the kernel shows it); the daemon's opens are patched at ``os.open`` only.
"""

import errno
import functools
import logging
import os
import threading
import time

import pytest

from nvmeof_mp import inuse, kernel
from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import host

from simlab import fabrics_host


def body(entrypoint):
    """The function behind an oslo.privsep entrypoint (what the daemon runs)."""
    assert isinstance(entrypoint, functools.partial), entrypoint
    return entrypoint.args[0]


@pytest.fixture
def sim(tmp_path):
    """nvme0n1 (259:0) and nvme1n1 (259:1), both NVMe-oF, nothing using them."""
    return fabrics_host(str(tmp_path / "host"))


# -- client side: in_use -------------------------------------------------------------------


def test_nothing_in_use_and_missing_files_mean_not_in_use(sim, tmp_path):
    assert not os.path.exists(os.path.join(sim.root, "proc/self/mountinfo"))
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {}
    assert inuse.in_use(sim.root, ["nvme9n9"]) == {}            # no such device
    assert inuse.in_use(str(tmp_path / "empty"), ["nvme0n1"]) == {}
    assert inuse.in_use(sim.root, []) == {}


def test_a_holder_is_named(sim):
    sim.add_holder("nvme0n1", "dm-3")
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {"nvme0n1": "held by dm-3"}
    sim.add_holder("nvme0n1", "md127")
    assert inuse.in_use(sim.root, ["nvme0n1"]) == {"nvme0n1": "held by dm-3, md127"}
    sim.remove_holder("nvme0n1", "dm-3")
    sim.remove_holder("nvme0n1", "md127")
    assert inuse.in_use(sim.root, ["nvme0n1"]) == {}


def test_a_partition_holder_is_named(sim):
    part = sim.add_partition("nvme1n1", 1)
    assert part == "nvme1n1p1"
    assert inuse.in_use(sim.root, ["nvme1n1"]) == {}            # a partition alone is no use
    sim.add_holder(part, "dm-0")
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {
        "nvme1n1": "partition nvme1n1p1 held by dm-0"}


def test_a_mount_is_found_by_device_number(sim):
    sim.mount("nvme1n1", "/mnt/vol 1")                # the kernel escapes the space
    with open(os.path.join(sim.root, "proc/self/mountinfo")) as f:
        assert "/mnt/vol\\0401" in f.read()
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {
        "nvme1n1": "mounted at /mnt/vol 1"}
    sim.unmount("/mnt/vol 1")
    assert inuse.in_use(sim.root, ["nvme1n1"]) == {}


def test_a_mount_is_found_by_source_when_the_number_is_anonymous(sim):
    """btrfs shows an anonymous device number (0:NN) in mountinfo, the source names it."""
    path = os.path.join(sim.root, "proc/self/mountinfo")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("21 1 0:19 / / rw - ext4 /dev/sda1 rw\n"
                "40 21 0:45 / /srv rw shared:9 - btrfs /dev/nvme0n1 rw,space_cache\n")
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {"nvme0n1": "mounted at /srv"}


def test_a_partition_mount_is_named(sim):
    sim.add_partition("nvme0n1", 1)
    part = sim.add_partition("nvme0n1", 2)
    sim.mount(part, "/boot")
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {
        "nvme0n1": "partition nvme0n1p2 mounted at /boot"}


def test_swap_is_named(sim):
    sim.swapon("nvme0n1")
    part = sim.add_partition("nvme1n1", 3)
    sim.swapon(part)
    assert inuse.in_use(sim.root, ["nvme0n1", "nvme1n1"]) == {
        "nvme0n1": "used as swap", "nvme1n1": "partition nvme1n1p3 used as swap"}


def test_every_use_is_told(sim):
    sim.add_holder("nvme0n1", "dm-1")
    sim.mount("nvme0n1", "/a")
    sim.mount("nvme0n1", "/b")
    assert inuse.in_use(sim.root, ["nvme0n1"]) == {
        "nvme0n1": "held by dm-1; mounted at /a (+1 more)"}


def test_mountinfo_is_read_once_per_call(sim, monkeypatch):
    sim.mount("nvme0n1", "/a")
    reads = []
    real = inuse.read_attr
    monkeypatch.setattr(inuse, "read_attr", lambda p: reads.append(p) or real(p))
    inuse.in_use(sim.root, ["nvme0n1", "nvme1n1", "nvme0n1"])
    assert sum(p.endswith("mountinfo") for p in reads) == 1
    assert sum(p.endswith("swaps") for p in reads) == 1


def test_a_name_that_is_no_device_name_is_refused(sim):
    for bad in ("../nvme0n1", "nvme0n1/holders", "", "..", None):
        with pytest.raises(ValueError):
            inuse.in_use(sim.root, [bad])


# -- daemon side: busy_devices and the exclusive_busy entrypoint ---------------------------

BUSY = "open exclusively or held by another user"


@pytest.fixture
def opens(monkeypatch):
    """os.open of /dev paths answered by a table: an errno, a threading.Event to wait for
    (then a real fd), or nothing (a real fd of /dev/null).  Records (path, flags) and which
    fds were closed."""
    table, seen, fds = {}, [], []
    real_open = os.open

    def fake(path, flags, *args, **kwargs):
        if not str(path).startswith("/dev/"):
            return real_open(path, flags, *args, **kwargs)
        seen.append((path, flags))
        answer = table.get(path)
        if isinstance(answer, int):
            raise OSError(answer, os.strerror(answer), path)
        if isinstance(answer, threading.Event):
            answer.wait(10)
        fd = real_open(os.devnull, os.O_RDONLY)
        fds.append(fd)
        return fd
    monkeypatch.setattr(os, "open", fake)
    fake.table, fake.seen, fake.fds = table, seen, fds
    return fake


def _closed(fd):
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def test_ebusy_is_busy_and_every_open_is_exclusive_and_closed(opens):
    opens.table["/dev/nvme0n1"] = errno.EBUSY
    assert host.busy_devices(["/dev/nvme0n1", "/dev/nvme1n1"], 5) == {"/dev/nvme0n1": BUSY}
    assert sorted(p for p, _ in opens.seen) == ["/dev/nvme0n1", "/dev/nvme1n1"]
    want = os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC
    assert all(flags == want for _, flags in opens.seen)
    assert opens.fds and all(_closed(fd) for fd in opens.fds)


def test_other_open_errors_are_not_busy_but_reported(opens, caplog):
    opens.table["/dev/nvme0n1"] = errno.ENXIO
    with caplog.at_level(logging.DEBUG, logger=host.__name__):
        assert host.busy_devices(["/dev/nvme0n1"], 5) == {}
    assert any("/dev/nvme0n1" in r.getMessage() and os.strerror(errno.ENXIO) in r.getMessage()
               for r in caplog.records)


def test_an_open_that_does_not_return_counts_as_busy_within_the_deadline(opens):
    stuck = threading.Event()
    opens.table["/dev/nvme0n1"] = stuck
    opens.table["/dev/nvme2n1"] = errno.EBUSY
    try:
        start = time.monotonic()
        busy = host.busy_devices(["/dev/nvme0n1", "/dev/nvme1n1", "/dev/nvme2n1"], 0.3)
        took = time.monotonic() - start
        assert busy == {"/dev/nvme0n1": "open did not return within 0.3s", "/dev/nvme2n1": BUSY}
        assert 0.3 <= took < 3
        # while it is still stuck, another call does not pile up a second open of it
        before = len(opens.seen)
        start = time.monotonic()
        again = host.busy_devices(["/dev/nvme0n1"], 5)
        assert time.monotonic() - start < 1
        assert again == {"/dev/nvme0n1": "an earlier open has not returned yet"}
        assert len(opens.seen) == before
    finally:
        stuck.set()
    end = time.monotonic() + 5              # the late open's fd is closed when it returns
    while not (len(opens.fds) == 2 and all(_closed(fd) for fd in opens.fds)):
        assert time.monotonic() < end, "the late open's fd was never closed"
        time.sleep(0.01)
    while "/dev/nvme0n1" in host._OPENING:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert host.busy_devices(["/dev/nvme0n1"], 5) == {}


@pytest.fixture
def daemon(sim, monkeypatch):
    """The daemon's view of the simulated host's sysfs (nvme0n1, nvme1n1: NVMe-oF)."""
    monkeypatch.setattr(host, "SYS", sim.sys)
    return sim


def test_entrypoint_checks_every_device_before_opening_any(daemon, opens, tmp_path):
    disk = tmp_path / "host" / "sys" / "devices" / "pci0000:00" / "sda"
    disk.mkdir(parents=True)
    (tmp_path / "host" / "sys" / "class" / "block" / "sda").symlink_to(disk)
    for devices in (["/dev/nvme0n1", "/dev/sda"], ["/dev/nvme0n1", "/dev/nvme5n1"],
                    ["/dev/nvme0n1", "/dev/nvme1n1p1"], ["/dev/nvme0n1", None]):
        with pytest.raises(PrivilegedArgumentError):
            body(host.exclusive_busy)(devices)
    for not_a_list in ("/dev/nvme0n1", None, {"/dev/nvme0n1": 1}):
        with pytest.raises(PrivilegedArgumentError):
            body(host.exclusive_busy)(not_a_list)
    assert opens.seen == []
    opens.table["/dev/nvme1n1"] = errno.EBUSY
    assert body(host.exclusive_busy)(["/dev/nvme0n1", "/dev/nvme1n1"]) == {
        "/dev/nvme1n1": BUSY}


def test_entrypoint_takes_a_bounded_number_of_devices(daemon, opens):
    with pytest.raises(PrivilegedArgumentError):
        body(host.exclusive_busy)(["/dev/nvme0n1"] * (host.EXCLUSIVE_MAX_DEVICES + 1))
    assert opens.seen == []


def test_privileged_kernel_calls_the_entrypoint(monkeypatch):
    from nvmeof_mp import privileged
    monkeypatch.setattr(privileged, "ensure_started", lambda: None)
    monkeypatch.setattr(host, "exclusive_busy",
                        lambda devices: {d: BUSY for d in devices if d.endswith("1")})
    k = kernel.PrivilegedKernel()
    assert k.exclusive_busy(("/dev/nvme0n1", "/dev/nvme0n2")) == {"/dev/nvme0n1": BUSY}
    assert k.calls["exclusive_busy"] == 1


# -- the simulated host's exclusive opens --------------------------------------------------


def test_sim_exclusive_open_fails_on_a_held_mounted_or_swapped_device(sim):
    devs = ["/dev/nvme0n1", "/dev/nvme1n1"]
    assert sim.exclusive_busy(devs) == {}
    sim.hold_open("/dev/nvme0n1")
    assert sim.exclusive_busy(devs) == {"/dev/nvme0n1": BUSY}
    sim.release("/dev/nvme0n1")
    assert sim.exclusive_busy(devs) == {}
    part = sim.add_partition("nvme1n1", 1)
    sim.mount(part, "/data")                # a claimed partition claims the whole disk
    assert sim.exclusive_busy(devs) == {"/dev/nvme1n1": BUSY}
    sim.unmount("/data")
    sim.add_holder("nvme0n1", "dm-2")
    sim.swapon(part)
    assert sim.exclusive_busy(devs) == {"/dev/nvme0n1": BUSY, "/dev/nvme1n1": BUSY}
    assert sim.calls["exclusive_busy"] == 5


def test_sim_exclusive_open_refuses_what_the_daemon_refuses(sim):
    part = sim.add_partition("nvme0n1", 1)
    for devices in (["/dev/" + part], ["/dev/nvme0n1", "/dev/nvme7n1"], ["nvme0n1"]):
        with pytest.raises(PrivilegedArgumentError):
            sim.exclusive_busy(devices)


def test_sim_exclusive_open_that_hangs_counts_as_busy_after_the_daemon_timeout(sim):
    sim.hang_open("/dev/nvme1n1")
    start = sim.clock.now
    assert sim.exclusive_busy(["/dev/nvme0n1", "/dev/nvme1n1"]) == {
        "/dev/nvme1n1": "open did not return within %gs" % host.EXCLUSIVE_TIMEOUT}
    assert sim.clock.now - start == host.EXCLUSIVE_TIMEOUT
    sim.release("/dev/nvme1n1")
    assert sim.exclusive_busy(["/dev/nvme1n1"]) == {}

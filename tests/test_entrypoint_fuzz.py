"""Every privileged entrypoint, fed hostile strings: refused, and nothing reaches the kernel.

The entrypoints' bodies run in-process (no daemon).  Whatever would act - a subprocess
(mdadm, dmsetup, nvme-cli), a sysfs write, a /dev/nvme-fabrics write, an ioctl, an open of a
device - is replaced by a recorder; a hostile value must be refused before any of them runs.
"""

import fcntl
import functools
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nvmeof_mp import blockdev
from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import dmsetup, host, nvme, storage

# At least one character that a tool, the kernel's option parser or a path would split on.
DANGER = [",", "=", "\n", "\r", " ", "\t", "/", "%", "\x00", ";", "$(", "`", "*", "'",
          "\"", "\\", "|", "&", "\u200b", "\x7f"]
# What splits the fabrics option string ("key=value,key=value\n") or an argv element: the
# only danger for values that travel there and nowhere else (an NQN may hold '/' or ';').
SPLITTERS = [",", "=", "\n", "\r", " ", "\t", "\x00", "\u200b", "\x7f"]
SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.:", max_size=12)
hostile = st.builds(lambda a, d, b: a + d + b, SAFE, st.sampled_from(DANGER), SAFE)
splitting = st.builds(lambda a, d, b: a + d + b, SAFE, st.sampled_from(SPLITTERS), SAFE)
OPTION_STRING_ONLY = {"connect_portal nqn"}


def body(entrypoint):
    """The function behind an oslo.privsep entrypoint (what the daemon runs)."""
    assert isinstance(entrypoint, functools.partial), entrypoint
    return entrypoint.args[0]


CALLS = {
    "delete_controller": lambda h: body(nvme.delete_controller)(h),
    "rescan_controllers": lambda h: body(nvme.rescan_controllers)([h]),
    "set_controller_attrs name": lambda h: body(nvme.set_controller_attrs)(h, {
        "ctrl_loss_tmo": -1}),
    "set_controller_attrs attr": lambda h: body(nvme.set_controller_attrs)("nvme0", {h: 1}),
    "identify_namespace_size": lambda h: body(nvme.identify_namespace_size)("/dev/" + h),
    "connect_portal method": lambda h: body(nvme.connect_portal)(
        {"nqn": "nqn.2014-08.org.x:a", "traddr": "127.0.0.1", "trsvcid": "4420",
         "transport": "tcp"}, h),
    "connect_portal nqn": lambda h: body(nvme.connect_portal)(
        {"nqn": "nqn.2014-08.org.x:" + h, "traddr": "127.0.0.1", "trsvcid": "4420",
         "transport": "tcp"}, "fabrics"),
    "connect_portal traddr": lambda h: body(nvme.connect_portal)(
        {"nqn": "nqn.2014-08.org.x:a", "traddr": "fe80::1%" + h, "trsvcid": "4420",
         "transport": "tcp"}, "fabrics"),
    "flush_device": lambda h: body(host.flush_device)("/dev/" + h),
    "read_first_sector": lambda h: body(host.read_first_sector)("/dev/" + h),
    "exclusive_busy": lambda h: body(host.exclusive_busy)(["/dev/" + h]),
    "md_create name": lambda h: body(storage.md_create)(h, ["/dev/nvme0n1"], 1),
    "md_create leg": lambda h: body(storage.md_create)("vol1", ["/dev/" + h], 1),
    "md_assemble": lambda h: body(storage.md_assemble)(h, ["/dev/nvme0n1"]),
    "md_add": lambda h: body(storage.md_add)("vol1", "/dev/" + h),
    "md_stop_inactive name": lambda h: body(storage.md_stop_inactive)(h, ["/dev/nvme0n1"]),
    "md_stop_inactive leg": lambda h: body(storage.md_stop_inactive)("vol1", ["/dev/" + h]),
    "md_re_add name": lambda h: body(storage.md_re_add)(h, "/dev/nvme0n1"),
    "md_re_add leg": lambda h: body(storage.md_re_add)("vol1", "/dev/" + h),
    "md_stop": lambda h: body(storage.md_stop)(h),
    "md_grow": lambda h: body(storage.md_grow)(h),
    "md_examine": lambda h: body(storage.md_examine)("/dev/" + h),
    "dm_create name": lambda h: body(dmsetup.dm_create)(h, 2048, ["259:0"]),
    "dm_create path": lambda h: body(dmsetup.dm_create)("vol", 2048, [h]),
    "dm_reload name": lambda h: body(dmsetup.dm_reload)(h, 2048, ["259:0"]),
    "dm_reload path": lambda h: body(dmsetup.dm_reload)("vol", 2048, [h]),
    "dm_message name": lambda h: body(dmsetup.dm_message)(h, "fail_if_no_path"),
    "dm_message message": lambda h: body(dmsetup.dm_message)("vol", h),
    "dm_message path": lambda h: body(dmsetup.dm_message)("vol", "fail_path", h),
    "dm_status": lambda h: body(dmsetup.dm_status)(h),
    "dm_remove": lambda h: body(dmsetup.dm_remove)(h),
}


@pytest.fixture
def acted(monkeypatch):
    """Records every way an entrypoint could reach the kernel or run a tool."""
    seen = []

    def record(what):
        def fn(*args, **kwargs):
            seen.append((what, args))
            raise AssertionError("reached the kernel: %s %r" % (what, args))
        return fn
    monkeypatch.setattr(subprocess, "run", record("subprocess"))
    monkeypatch.setattr(subprocess, "Popen", record("subprocess"))
    monkeypatch.setattr(nvme, "_write_sysfs", record("sysfs write"))
    monkeypatch.setattr(nvme, "_connect_fabrics", record("/dev/nvme-fabrics"))
    monkeypatch.setattr(nvme, "_connect_cli", record("nvme-cli"))
    monkeypatch.setattr(fcntl, "ioctl", record("ioctl"))
    monkeypatch.setattr(host, "_flush", record("flush"))
    monkeypatch.setattr(blockdev, "read_first_sector", record("read"))
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (
        record("open")(p) if str(p).startswith("/dev/") else real_open(p, *a, **k)))
    return seen


@pytest.mark.parametrize("call", sorted(CALLS))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile, splitting)
def test_hostile_strings_never_reach_the_kernel(acted, call, value, splitter):
    with pytest.raises(PrivilegedArgumentError):
        CALLS[call](splitter if call in OPTION_STRING_ONLY else value)
    assert acted == []


@pytest.mark.parametrize("call", ["dm_status", "md_stop", "delete_controller",
                                  "dm_message path", "md_examine"])
def test_a_trailing_newline_is_refused(acted, call):
    """``re.match`` with ``$`` lets one trailing newline through: every check is a fullmatch."""
    valid = {"dm_status": "vol", "md_stop": "vol1", "delete_controller": "nvme0",
             "dm_message path": "259:0", "md_examine": "nvme0n1"}[call]
    with pytest.raises(PrivilegedArgumentError):
        CALLS[call](valid + "\n")
    assert acted == []


def test_a_secret_with_a_trailing_newline_is_refused():
    from nvmeof_mp import connection
    assert not connection.valid_secret("DHHC-1:00:ia6zGodOr4SEG0Zzaw398rpY0wqipUWj4jWjUh4H:\n")

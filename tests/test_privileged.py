"""Privileged entrypoints: argument checks and nvme-cli result handling.

The entrypoints' bodies are exercised in-process (no daemon) with a fake ``nvme`` program on
PATH that answers as nvme-cli 1.x and 2.3 do; nothing here needs root.
"""

import os
import stat

import ddt
import pytest
import unittest

from nvmeof_mp.exception import PrivilegedArgumentError
from nvmeof_mp.privileged import host, nvme

from simlab import NQN

GOOD = {"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420", "transport": "tcp",
        "host_nqn": "nqn.2014-08.org.nvmexpress:uuid:3a940e64-7dfc-485f-a005-76d53d71924d",
        "host_id": "ee968767-f125-4d4b-a901-62e3eca22e81", "ctrl_loss_tmo": 600,
        "reconnect_delay": 2, "fast_io_fail_tmo": 1}


@pytest.fixture
def fake_nvme(tmp_path, monkeypatch):
    """Install a fake nvme-cli printing ``out`` and exiting with ``rc``; returns a setter."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    log = tmp_path / "argv"

    def install(out, rc):
        script = bindir / "nvme"
        script.write_text("#!/bin/sh\necho \"$@\" > %s\nprintf '%%s\\n' '%s'\nexit %d\n"
                          % (log, out, rc))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return log
    return install


@pytest.mark.parametrize("out,rc", [
    ("already connected", 1),            # nvme-cli 2.3 (lab capture)
    ("Failed to write to /dev/nvme-fabrics: Operation already in progress", 114),
    ("", 70),                            # nvme-cli 1.x EALREADY mapped
    ("already connnected", 1),           # the typo some versions print
])
def test_already_connected_in_every_form(fake_nvme, out, rc):
    fake_nvme(out, rc)
    result = nvme._connect_cli(nvme.connect_options(dict(GOOD)))
    assert result["already"] is True


def test_connect_failure_is_reported_not_already(fake_nvme):
    fake_nvme("Failed to write to /dev/nvme-fabrics: Connection refused", 1)
    result = nvme._connect_cli(nvme.connect_options(dict(GOOD)))
    assert result["already"] is False and "Connection refused" in result["error"]


def test_connect_success_parses_json_device(fake_nvme, monkeypatch, tmp_path):
    log = fake_nvme('{"device":"nvme1"}', 0)
    (tmp_path / "nvme1").mkdir()
    (tmp_path / "nvme1" / "transport").write_text("tcp\n")
    monkeypatch.setattr(nvme, "SYS_CLASS_NVME", str(tmp_path))
    written = []
    monkeypatch.setattr(nvme, "_write_sysfs", lambda n, a, v: written.append((n, a, v)))
    result = nvme._connect_cli(nvme.connect_options(dict(GOOD)))
    assert result == {"controller": "nvme1"}
    argv = log.read_text().split()
    assert argv[:2] == ["connect", "-t"] and "-l" in argv and "600" in argv
    # nvme-cli 2.3 has no fast_io_fail_tmo option: set through sysfs in the same call
    assert written == [("nvme1", "fast_io_fail_tmo", "1")]


def test_nvme_cli_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = nvme._connect_cli(nvme.connect_options(dict(GOOD)))
    assert "not installed" in result["error"]


def test_fabrics_option_string_has_every_option_and_no_injection():
    s = nvme.fabrics_option_string(nvme.connect_options(dict(GOOD)))
    assert s.startswith("nqn=%s,transport=tcp,traddr=127.0.0.1,trsvcid=4420," % NQN)
    assert "hostnqn=" in s and "fast_io_fail_tmo=1" in s and "ctrl_loss_tmo=600" in s
    with pytest.raises(PrivilegedArgumentError):
        nvme.connect_options(dict(GOOD, nqn=NQN + ",traddr=10.0.0.1"))


@ddt.ddt
class TestArgumentChecks(unittest.TestCase):
    @ddt.data(dict(GOOD, traddr="1.2.3.4; rm -rf /"), dict(GOOD, trsvcid="0"),
              dict(GOOD, transport="fc"), dict(GOOD, host_id="x" * 40),
              dict(GOOD, ctrl_loss_tmo="600"), dict(GOOD, reconnect_delay=10 ** 9),
              dict(GOOD, dhchap_secret="plain"), "not a dict")
    def test_connect_options_refused(self, opts):
        with self.assertRaises(PrivilegedArgumentError):
            nvme.connect_options(opts)

    @ddt.data("nvme0/../../x", "sda", "nvme", "", None, "nvme1 ")
    def test_controller_names_refused(self, name):
        with self.assertRaises(PrivilegedArgumentError):
            nvme.controller_name(name)

    @ddt.data("/dev/sda", "/dev/nvme0", "/dev/md/../sda", "/etc/passwd", "/dev/mapper/a b")
    def test_device_paths_refused(self, path):
        with self.assertRaises(PrivilegedArgumentError):
            host.device_path(path)

    @ddt.data("/dev/nvme10n10", "/dev/md127", "/dev/md/vol1", "/dev/dm-3",
              "/dev/mapper/8d2f4f9a-1b7e-4c2a-9a55-3f1e6c2b7d01")
    def test_device_paths_accepted(self, path):
        self.assertEqual(path, host.device_path(path))

    def test_only_timeouts_are_tunable(self):
        with self.assertRaises(PrivilegedArgumentError):
            nvme._write_attr("nvme0", "delete_controller", 1)
        with self.assertRaises(PrivilegedArgumentError):
            nvme._write_attr("nvme0", "ctrl_loss_tmo", "1; reboot")


def test_host_identity_is_created_once_from_system_uuid_with_newline(tmp_path):
    (tmp_path / "sys/class/dmi/id").mkdir(parents=True)
    (tmp_path / "sys/class/dmi/id/product_uuid").write_text(
        "3A940E64-7DFC-485F-A005-76D53D71924D\n")
    first = host.ensure_identity_files(str(tmp_path))
    assert first == ("nqn.2014-08.org.nvmexpress:uuid:3a940e64-7dfc-485f-a005-76d53d71924d",
                     "3a940e64-7dfc-485f-a005-76d53d71924d")
    assert (tmp_path / "etc/nvme/hostnqn").read_text().strip() == first[0]
    (tmp_path / "sys/class/dmi/id/product_uuid").write_text(
        "00000000-0000-4000-8000-000000000001\n")
    assert host.ensure_identity_files(str(tmp_path)) == first     # stable, never regenerated


def test_host_identity_falls_back_to_machine_id(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    a = host.ensure_identity_files(str(tmp_path))
    os.unlink(tmp_path / "etc/nvme/hostnqn")
    os.unlink(tmp_path / "etc/nvme/hostid")
    assert host.ensure_identity_files(str(tmp_path)) == a          # derived, not random


def test_multipath_table_is_built_from_validated_parts():
    from nvmeof_mp.privileged import dmsetup
    table = dmsetup.multipath_table(131072, ["259:0", "259:1"])
    assert table == ("0 131072 multipath 3 queue_if_no_path queue_mode bio 0 1 1 "
                     "round-robin 0 2 1 259:0 1 259:1 1")
    with pytest.raises(PrivilegedArgumentError):
        dmsetup.multipath_table(8, ["259:0 1 0 linear /dev/sda"])


def test_multipath_status_parsing():
    from nvmeof_mp.privileged import dmsetup
    # dmsetup status of a 2-path map with one path failed (lab capture form)
    text = "0 131072 multipath 2 0 0 0 1 1 A 0 2 1 259:0 F 1 259:1 A 0"
    assert dmsetup.parse_multipath_status(text) == {"259:0": "F", "259:1": "A"}


def test_mdadm_create_takes_every_leg_and_forces_one_disk():
    from nvmeof_mp.privileged import storage
    argv = storage.mdadm_create_argv("vol1", ["/dev/nvme0n1", "/dev/nvme1n1"], "u")
    assert argv[-2:] == ["/dev/nvme0n1", "/dev/nvme1n1"] and "--raid-devices=2" in argv
    assert "--bitmap=internal" in argv and "--failfast" in argv and "--uuid=u" in argv
    assert "--force" in storage.mdadm_create_argv("vol1", ["/dev/nvme0n1"], "u")
    with pytest.raises(PrivilegedArgumentError):
        storage.alias("../../etc")
    with pytest.raises(PrivilegedArgumentError):
        storage.nvme_devices(["/dev/sda"])


def test_connect_many_checks_every_portal_before_connecting_any(monkeypatch):
    connected = []
    monkeypatch.setattr(nvme, "_connect", lambda o, m: connected.append(o) or {})
    bad = dict(GOOD, traddr="127.0.0.1;reboot")
    with pytest.raises(PrivilegedArgumentError):
        nvme.connect_many([dict(GOOD), bad], "fabrics")
    for wrong in ([], [dict(GOOD)] * (nvme.MAX_PORTALS + 1), dict(GOOD)):
        with pytest.raises(PrivilegedArgumentError):
            nvme.connect_many(wrong, "fabrics")
    with pytest.raises(PrivilegedArgumentError):
        nvme.connect_many([dict(GOOD)], "telnet")
    assert connected == []


def test_connect_many_runs_nvme_cli_processes_concurrently_and_answers_in_order(monkeypatch):
    import threading
    barrier = threading.Barrier(3, timeout=5)

    def connect(opts, method):
        barrier.wait()                  # all three must be in flight together
        return {"controller": "nvme%s" % (int(opts["trsvcid"]) - 4420)}
    monkeypatch.setattr(nvme, "_connect", connect)
    portals = [dict(GOOD, trsvcid=str(4420 + i)) for i in range(3)]
    assert nvme.connect_many(portals, "nvme-cli") == [
        {"controller": "nvme0"}, {"controller": "nvme1"}, {"controller": "nvme2"}]


def test_fabrics_writes_of_one_call_go_back_to_back_and_calls_in_arrival_order(
        tmp_path, monkeypatch):
    """Two attaches at once: the first one's portals are all written before the second's."""
    import threading
    import time
    fabrics = tmp_path / "nvme-fabrics"
    fabrics.write_text("")
    monkeypatch.setattr(nvme, "FABRICS_DEV", str(fabrics))
    written, first_in = [], threading.Event()

    def write(opts):
        first_in.set()
        time.sleep(0.01)                # let the other call's thread run if it could
        written.append((opts["nqn"], opts["trsvcid"]))
        return {"controller": "nvme%d" % len(written)}
    monkeypatch.setattr(nvme, "_connect_fabrics", write)
    calls = [[dict(GOOD, nqn=NQN + n, trsvcid=str(4420 + i)) for i in range(3)]
             for n in ("a", "b")]
    replies = {}

    def attach(n, opts):
        replies[n] = nvme.connect_many(opts, "fabrics")
    first = threading.Thread(target=attach, args=("a", calls[0]))
    first.start()
    first_in.wait(5)
    second = threading.Thread(target=attach, args=("b", calls[1]))
    second.start()
    first.join(5)
    second.join(5)
    assert written == [(NQN + n, str(4420 + i)) for n in ("a", "b") for i in range(3)]
    assert replies["b"] == [{"controller": "nvme%d" % i} for i in (4, 5, 6)]
    assert nvme._FABRICS_TURN.queued == 0


def test_daemon_runs_enough_calls_at_once_that_slow_connects_block_nothing_else():
    from nvmeof_mp import privileged
    assert privileged.default.conf.thread_pool_size == privileged.DAEMON_THREADS >= 16


def test_connect_calls_in_flight_are_capped_below_the_daemon_threads(monkeypatch):
    """Forty attaches at once must leave daemon threads free for flushes and deletes."""
    import threading
    import time
    from nvmeof_mp import kernel, privileged
    monkeypatch.setattr(privileged, "ensure_started", lambda: None)
    inside, most, lock, release = [0], [0], threading.Lock(), threading.Event()

    def connect_portals(opts_list, method, hold=None):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(10)
        with lock:
            inside[0] -= 1
        return [{"controller": "nvme0"}] * len(opts_list)
    monkeypatch.setattr(nvme, "connect_portals", connect_portals)
    k = kernel.PrivilegedKernel()
    two = [dict(GOOD), dict(GOOD, trsvcid="4421")]
    attaches = [threading.Thread(target=k.connect_all, args=(two,)) for _ in range(40)]
    for t in attaches:
        t.start()
    end = time.monotonic() + 10
    while inside[0] < kernel.CONNECT_CALLS_IN_FLIGHT and time.monotonic() < end:
        time.sleep(0.005)
    time.sleep(0.05)                    # would the 25th get in?
    assert inside[0] == kernel.CONNECT_CALLS_IN_FLIGHT
    release.set()
    for t in attaches:
        t.join(10)
    assert most[0] == kernel.CONNECT_CALLS_IN_FLIGHT < privileged.DAEMON_THREADS
    assert k.calls["connect_all"] == 40


def test_a_hold_given_with_a_connect_is_written_first_and_a_bad_one_connects_nothing(
        monkeypatch):
    from nvmeof_mp.privileged import registry
    order = []
    monkeypatch.setattr(registry, "hold", lambda root, **kw: order.append(("hold", kw["key"])))
    monkeypatch.setattr(nvme, "_connect", lambda opts, method: order.append(("connect",)) or {
        "controller": "nvme0"})
    hold = {"key": "ns:x", "nqn": GOOD["nqn"], "host_nqn": GOOD["nqn"], "adopted": False,
            "owner": {}, "record": None, "secret_info": None}
    assert nvme.connect_many([GOOD], "fabrics", hold) == [{"controller": "nvme0"}]
    assert order == [("hold", "ns:x"), ("connect",)]
    order.clear()
    with pytest.raises(PrivilegedArgumentError, match="hold"):
        nvme.connect_many([GOOD], "fabrics", dict(hold, path="/etc/passwd"))
    assert order == []

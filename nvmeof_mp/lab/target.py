"""nvmet (kernel NVMe-oF target) driven through configfs, plus a socket agent (guest side).

Runs as root inside the lab VM; stdlib only so it starts fast under TCG.  Tests that run
the connector as the unprivileged lab user cannot write configfs, so the root process
starts :class:`TargetAgent` and the tests drive the target with :class:`TargetClient`
(socket path in ``$NVMEOF_MP_TARGET_SOCK``).

Kernel facts this encodes (nvmet, Linux 6.1):
- a tmpfs-backed namespace needs ``buffered_io=1`` before ``enable`` (no O_DIRECT on tmpfs);
- unlinking the last subsystem from a port closes its listener (ECONNREFUSED): a realistic
  "path down"; re-linking brings it back;
- ANA group 1 always exists on every port; other groups must be created per port before a
  namespace can use them;
- rdma ports (``trtype="rdma"``) need soft-RoCE on a non-loopback address: :meth:`Target.rdma`.
"""

import json
import os
import shutil
import re
import socket
import socketserver
import subprocess
import threading
from pathlib import Path

CONFIGFS = Path("/sys/kernel/config/nvmet")
#: what ``Target.rdma`` found, once per VM (the rxe link outlives a Target)
_RDMA = None
ANA_STATES = ("optimized", "non-optimized", "inaccessible", "persistent-loss", "change")


def _write(path: Path, value) -> None:
    path.write_text(f"{value}\n")


class Target:
    """Model of one nvmet configuration; ``teardown()`` removes what this object created."""

    def __init__(self, root: Path = CONFIGFS, backing_dir: str = "/run/nvmeof-lab"):
        self.root = Path(root)
        self.backing_dir = Path(backing_dir)
        if not self.root.is_dir():
            raise RuntimeError(f"{self.root} missing: modprobe nvmet and mount configfs")
        self._ana_groups = {1}
        self._backing_files: list[Path] = []
        self._loops: list[str] = []
        self._held: list[int] = []
        self._dropping: set[int] = set()
        self._stopped: dict[str, dict] = {}

    # -- subsystems / namespaces ------------------------------------------------------------
    def _subsys(self, nqn: str) -> Path:
        return self.root / "subsystems" / nqn

    def add_subsystem(self, nqn: str, allow_any_host: bool = True) -> None:
        path = self._subsys(nqn)
        path.mkdir()
        _write(path / "attr_allow_any_host", int(allow_any_host))

    def allow_host(self, nqn: str, hostnqn: str) -> None:
        """Restrict ``nqn`` to listed hosts (use with ``allow_any_host=False``)."""
        host = self.root / "hosts" / hostnqn
        host.mkdir(exist_ok=True)
        (self._subsys(nqn) / "allowed_hosts" / hostnqn).symlink_to(host)

    def set_host_keys(self, hostnqn: str, key=None, ctrl_key=None) -> None:
        """DH-HMAC-CHAP keys of ``hostnqn`` (``DHHC-1:..`` strings): ``key`` the host must
        present, ``ctrl_key`` the target answers with (bidirectional).  Needs
        NVME_TARGET_AUTH (6.12, not Debian's 6.1)."""
        host = self.root / "hosts" / hostnqn
        host.mkdir(exist_ok=True)
        for attr, value in (("dhchap_key", key), ("dhchap_ctrl_key", ctrl_key)):
            if value is not None:
                _write(host / attr, value)

    def auth_supported(self) -> bool:
        """Can this nvmet authenticate hosts (a host entry has a dhchap_key attribute)?"""
        probe = self.root / "hosts" / "nqn.2014-08.org.nvmexpress:lab-auth-probe"
        probe.mkdir(exist_ok=True)
        try:
            return (probe / "dhchap_key").exists()
        finally:
            probe.rmdir()

    def add_namespace(self, nqn: str, nsid: int, size_mb: int, uuid: str, nguid=None,
                      ana_group=None, backing=None, lba=4096) -> str:
        """Create and enable a namespace; without ``backing`` a sparse tmpfs file is made.

        A tmpfs file gives a 4 KiB LBA format (nvmet uses the file's block size); ``lba=512``
        puts a 512-byte-sector loop device in between instead.

        Returns the backing path.
        """
        if backing is None:
            self.backing_dir.mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", nqn)
            backing = str(self.backing_dir / f"{safe}-ns{nsid}.img")
            with open(backing, "wb") as f:
                f.truncate(size_mb * 1024 * 1024)
            self._backing_files.append(Path(backing))
            if lba == 512:
                backing = subprocess.run(
                    ["losetup", "--find", "--show", "--sector-size", "512", backing],
                    check=True, capture_output=True, text=True).stdout.strip()
                self._loops.append(backing)
        if ana_group is not None:
            self._ensure_ana_group(int(ana_group))
        ns = self._subsys(nqn) / "namespaces" / str(nsid)
        ns.mkdir()
        _write(ns / "device_path", backing)
        if Path(backing).is_file():
            _write(ns / "buffered_io", 1)
        _write(ns / "device_uuid", uuid)
        if nguid:
            _write(ns / "device_nguid", nguid)  # 32 hex digits, "-" allowed
        if ana_group is not None:
            _write(ns / "ana_grpid", ana_group)
        _write(ns / "enable", 1)
        return backing

    def resize_namespace(self, nqn: str, nsid: int, size_mb: int) -> None:
        """Grow/shrink a file-backed namespace and tell nvmet (hosts get an AEN)."""
        ns = self._subsys(nqn) / "namespaces" / str(nsid)
        backing = (ns / "device_path").read_text().strip()
        loop = None
        if backing.startswith("/dev/loop"):
            loop = backing
            name = os.path.basename(loop)
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        with open(backing, "r+b") as f:
            f.truncate(size_mb * 1024 * 1024)
        if loop:
            subprocess.run(["losetup", "--set-capacity", loop], check=True)
        _write(ns / "revalidate_size", 1)

    def remove_namespace(self, nqn: str, nsid: int) -> None:
        ns = self._subsys(nqn) / "namespaces" / str(nsid)
        _write(ns / "enable", 0)
        ns.rmdir()

    # -- ports ----------------------------------------------------------------------------
    def _port(self, port_id) -> Path:
        return self.root / "ports" / str(port_id)

    def add_port(self, port_id: int, trsvcid, traddr: str = "127.0.0.1", trtype: str = "tcp",
                 adrfam: str | None = None) -> None:
        """A listening port; ``adrfam`` follows ``traddr`` unless given (``::1``: ipv6)."""
        adrfam = adrfam or ("ipv6" if ":" in traddr else "ipv4")
        port = self._port(port_id)
        port.mkdir()
        _write(port / "addr_trtype", trtype)
        _write(port / "addr_adrfam", adrfam)
        _write(port / "addr_traddr", traddr)
        _write(port / "addr_trsvcid", trsvcid)
        for group in self._ana_groups - {1}:
            (port / "ana_groups" / str(group)).mkdir(exist_ok=True)

    def link(self, port_id: int, nqn: str) -> None:
        """Expose ``nqn`` on the port (opens the listener if it is the first)."""
        (self._port(port_id) / "subsystems" / nqn).symlink_to(self._subsys(nqn))

    def unlink(self, port_id: int, nqn: str) -> None:
        """Withdraw ``nqn`` from the port: its controllers there drop (path down)."""
        (self._port(port_id) / "subsystems" / nqn).unlink()

    def _ensure_ana_group(self, group: int) -> None:
        self._ana_groups.add(group)
        for port in (self.root / "ports").iterdir():
            (port / "ana_groups" / str(group)).mkdir(exist_ok=True)

    def set_ana_state(self, port_id: int, group: int, state: str) -> None:
        if state not in ANA_STATES:
            raise ValueError(f"ANA state {state!r} not in {ANA_STATES}")
        self._ensure_ana_group(int(group))
        _write(self._port(port_id) / "ana_groups" / str(group) / "ana_state", state)

    # -- faults beyond an unlink (tests/gate/test_gate_faults.py) ---------------------------
    def drop_port(self, trsvcid) -> None:
        """Drop every TCP segment to or from ``trsvcid`` on loopback, silently (no RST, no
        ICMP): only keep-alive and I/O timeouts notice.  tc on lo sees both directions."""
        svc = int(trsvcid)
        lines = [] if self._dropping else ["qdisc add dev lo root handle 1: prio"]
        lines += ["filter add dev lo parent 1: protocol ip prio 1 u32 match ip protocol 6 0xff "
                  "match ip %s %d 0xffff action drop" % (field, svc)
                  for field in ("dport", "sport")]
        # one tc process for all of it: both directions start dropping together, and the
        # emulated VM pays for one process start instead of three
        subprocess.run(["tc", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                       check=True, capture_output=True)
        self._dropping.add(svc)

    def undrop_ports(self) -> None:
        """Remove every drop rule (the whole qdisc: nothing else of ours lives on lo)."""
        if self._dropping:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        self._dropping.clear()

    def stop_subsystem(self, nqn: str) -> None:
        """A target restart, first half: unlink ``nqn`` from its ports, remove ports left
        empty, disable and remove its namespaces and the subsystem; the backing data stays."""
        sub = self._subsys(nqn)
        saved = {"attrs": {}, "namespaces": [], "ports": [], "empty_ports": []}
        for attr in ("attr_allow_any_host", "attr_serial", "attr_model"):
            if (sub / attr).exists():
                saved["attrs"][attr] = (sub / attr).read_text().strip()
        for port in sorted((self.root / "ports").iterdir()):
            if (port / "subsystems" / nqn).is_symlink():
                (port / "subsystems" / nqn).unlink()
                saved["ports"].append(port.name)
                if not any((port / "subsystems").iterdir()):
                    saved["empty_ports"].append(self._port_config(port))
                    for group in (port / "ana_groups").iterdir():
                        if group.name != "1":
                            group.rmdir()
                    port.rmdir()
        for ns in sorted((sub / "namespaces").iterdir(), key=lambda p: int(p.name)):
            conf = {"nsid": ns.name}
            for attr in ("device_path", "device_uuid", "device_nguid", "ana_grpid",
                         "buffered_io"):
                if (ns / attr).exists():
                    conf[attr] = (ns / attr).read_text().strip()
            saved["namespaces"].append(conf)
            _write(ns / "enable", 0)
            ns.rmdir()
        sub.rmdir()
        self._stopped[nqn] = saved

    def start_subsystem(self, nqn: str) -> None:
        """Second half: re-create what ``stop_subsystem`` removed, with the same data."""
        saved = self._stopped.pop(nqn)
        for port in saved["empty_ports"]:
            self.add_port(port["id"], port["trsvcid"], port["traddr"], port["trtype"],
                          port["adrfam"])
            for group, state in port["ana"].items():
                self.set_ana_state(port["id"], int(group), state)
        sub = self._subsys(nqn)
        sub.mkdir()
        for attr, value in saved["attrs"].items():
            try:
                _write(sub / attr, value)
            except OSError:
                pass            # e.g. a serial the kernel will not take twice: not needed
        for conf in saved["namespaces"]:
            ns = sub / "namespaces" / conf["nsid"]
            ns.mkdir()
            for attr in ("device_path", "buffered_io", "device_uuid", "device_nguid",
                         "ana_grpid"):
                if attr in conf and not (attr == "device_nguid" and not conf[attr].strip("0-")):
                    _write(ns / attr, conf[attr])
            _write(ns / "enable", 1)
        for port in saved["ports"]:
            self.link(port, nqn)

    def _port_config(self, port: Path) -> dict:
        def attr(name):
            return (port / name).read_text().strip()
        return {"id": int(port.name), "trsvcid": attr("addr_trsvcid"),
                "traddr": attr("addr_traddr"), "trtype": attr("addr_trtype"),
                "adrfam": attr("addr_adrfam"),
                "ana": {g.name: (g / "ana_state").read_text().strip()
                        for g in (port / "ana_groups").iterdir()}}

    # -- multipathd alongside (tests/gate/test_gate_multipathd.py) ---------------------------
    def start_multipathd(self, greedy: bool = False, dropin: bool = False) -> str:
        """multipathd with Debian's default configuration (no /etc/multipath.conf), or with
        ``find_multipaths greedy``; with ``dropin`` the project's multipath drop-in
        (etc/multipath/conf.d) installed too.  Returns its version line."""
        return start_multipathd(greedy, dropin)

    def stop_multipathd(self) -> None:
        stop_multipathd()

    def multipathd_show(self, what: str = "maps") -> str:
        if what not in ("maps", "paths", "config"):
            raise ValueError(what)
        return _multipathd("show", what)

    def dm_status(self, name: str) -> dict:
        """The kernel's view of a dm-multipath map's paths (``dmsetup status``, root only):
        {"major:minor": "A" or "F"}; {} for a map that does not exist."""
        return dm_path_states(name)

    def dm_tables(self) -> dict:
        """Every dm map: name -> {"uuid": .., "table": ..}."""
        return dm_tables()

    # -- Cinder's LVM driver beside the target (tests/gate/test_gate_cinder.py) ------------
    def cinder(self, op: str, **kwargs):
        """``op`` of the Cinder worker (:mod:`.cinder`), started as root on first use."""
        from . import cinder
        return cinder.request(op, **kwargs)

    # -- inspection / cleanup ---------------------------------------------------------------
    def state(self) -> dict:
        """Snapshot: ports with linked subsystems and ANA states, subsystems with namespaces."""
        ports = {}
        for port in sorted((self.root / "ports").iterdir()):
            ports[port.name] = {
                "trsvcid": (port / "addr_trsvcid").read_text().strip(),
                "subsystems": sorted(p.name for p in (port / "subsystems").iterdir()),
                "ana": {g.name: (g / "ana_state").read_text().strip()
                        for g in (port / "ana_groups").iterdir()},
            }
        subsystems = {s.name: sorted(n.name for n in (s / "namespaces").iterdir())
                      for s in (self.root / "subsystems").iterdir()}
        return {"ports": ports, "subsystems": subsystems}

    def rdma(self) -> list:
        """Soft-RoCE for ``trtype="rdma"`` ports, set up on first use (:mod:`.rdma`):
        ``[address, None]``, or ``[None, why]`` where this VM cannot do RDMA."""
        global _RDMA
        if _RDMA is None:
            from . import rdma
            _RDMA = list(rdma.setup())
        return _RDMA

    def cleanup_initiator(self) -> list:
        return cleanup_initiator()

    def kill_process(self, pid: int) -> bool:
        """SIGKILL ``pid`` (a test kills a root privsep daemon it cannot signal itself);
        False if it was gone already."""
        return kill_process(pid)

    # "in use by something else" on the initiator, as an operator or another tool makes it

    def mount_scratch(self, device: str) -> str:
        """mkfs.ext4 on ``device`` and mount it (as by hand); returns the mount point."""
        if not device.startswith("/dev/nvme"):
            raise ValueError("not an NVMe device: %s" % device)
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        os.makedirs(SCRATCH_MOUNT, exist_ok=True)
        subprocess.run(["mount", device, SCRATCH_MOUNT], check=True, capture_output=True)
        return SCRATCH_MOUNT

    def umount_scratch(self) -> None:
        subprocess.run(["umount", SCRATCH_MOUNT], capture_output=True)

    def hold_exclusive(self, device: str) -> None:
        """Open ``device`` with O_EXCL and keep it open (as a tool that claims a disk)."""
        if not device.startswith("/dev/nvme"):
            raise ValueError("not an NVMe device: %s" % device)
        self._held.append(os.open(device, os.O_RDONLY | os.O_EXCL))

    def release_exclusive(self) -> None:
        while self._held:
            os.close(self._held.pop())

    def clear_registry(self) -> list:
        """Forget every attachment record (what a failed test left)."""
        return clear_registry()

    def secret_files(self, needle: str) -> dict:
        """The registry's secret files (root only): mode, owner and whether each holds
        ``needle``; the lab user cannot look into that directory itself."""
        return secret_files(needle)

    def watch_secret(self, *needles: str) -> None:
        """Start looking for ``needles`` in every process's cmdline and environ, as root,
        until ``watch_secret_result``."""
        if getattr(self, "_watch", None) is not None:
            self._watch.stop()
        self._watch = SecretWatch(needles)

    def watch_secret_result(self) -> dict:
        """Stop the watch: {"scans": passes made, "seen": ["<pid> <comm> <file>", ...]}, and
        whether the kernel log holds a needle."""
        watch, self._watch = self._watch, None
        return watch.stop()

    def teardown(self) -> None:
        """Remove every port, subsystem and host in dependency order (links first)."""
        self.release_exclusive()
        self.umount_scratch()
        self.undrop_ports()
        self._stopped.clear()
        for port in (self.root / "ports").iterdir():
            for link in (port / "subsystems").iterdir():
                link.unlink()
            for group in (port / "ana_groups").iterdir():
                if group.name != "1":
                    group.rmdir()
            port.rmdir()
        for subsys in (self.root / "subsystems").iterdir():
            for host in (subsys / "allowed_hosts").iterdir():
                host.unlink()
            for ns in (subsys / "namespaces").iterdir():
                _write(ns / "enable", 0)
                ns.rmdir()
            subsys.rmdir()
        for host in (self.root / "hosts").iterdir():
            host.rmdir()
        for loop in self._loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        self._loops.clear()
        for path in self._backing_files:
            path.unlink(missing_ok=True)
        self._backing_files.clear()
        self._ana_groups = {1}


def cleanup_initiator():
    """Remove what a failed test left on the initiator side (md arrays, our dm maps, every
    controller), so one failure does not cascade into the next tests.  Returns what it did."""
    done = []
    for md in sorted(d for d in os.listdir("/sys/block") if d.startswith("md")):
        subprocess.run(["mdadm", "--stop", "/dev/" + md], capture_output=True)
        done.append(md)
    for dm in sorted(d for d in os.listdir("/sys/block") if d.startswith("dm-")):
        name = Path("/sys/block/%s/dm/name" % dm).read_text().strip()
        subprocess.run(["dmsetup", "message", name, "0", "fail_if_no_path"], capture_output=True)
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
        done.append(name)
    for ctrl in sorted(os.listdir("/sys/class/nvme")):
        try:
            _write(Path("/sys/class/nvme") / ctrl / "delete_controller", 1)
            done.append(ctrl)
        except OSError:
            pass
    return done


REGISTRY = "/var/lib/nvmeof_mp"
SCRATCH_MOUNT = "/run/nvmeof-lab/scratch"


MULTIPATH_CONF = "/etc/multipath.conf"
MULTIPATHD_PID = "/run/multipathd.pid"


def _multipathd(*args) -> str:
    return subprocess.run(["multipathd", *args], capture_output=True, text=True,
                          timeout=30).stdout


MULTIPATH_WWIDS = "/etc/multipath/wwids"
MULTIPATH_BINDINGS = "/etc/multipath/bindings"
MULTIPATH_DROPIN = "/etc/multipath/conf.d/nvmeof-mp.conf"


def start_multipathd(greedy=False, dropin=False):
    if dropin:
        from .paths import project_dir
        os.makedirs(os.path.dirname(MULTIPATH_DROPIN), exist_ok=True)
        with open(project_dir() / "etc/multipath/conf.d/nvmeof-mp.conf") as src, \
                open(MULTIPATH_DROPIN, "w") as dst:
            dst.write(src.read())
    elif os.path.exists(MULTIPATH_DROPIN):
        os.unlink(MULTIPATH_DROPIN)
    if greedy:
        with open(MULTIPATH_CONF, "w") as f:
            f.write("defaults {\n    find_multipaths greedy\n}\n")
    elif os.path.exists(MULTIPATH_CONF):
        os.unlink(MULTIPATH_CONF)
    subprocess.run(["modprobe", "dm_multipath"], capture_output=True)
    subprocess.run(["multipathd"], check=True, capture_output=True, timeout=30)
    import time
    end = time.monotonic() + 30
    while time.monotonic() < end:       # lab helper: the daemon answers on its socket once up
        out = _multipathd("show", "daemon")
        if "running" in out or "idle" in out:
            break
        time.sleep(0.2)
    return _multipathd("show", "daemon").strip()


def stop_multipathd():
    subprocess.run(["multipathd", "shutdown"], capture_output=True, timeout=30)
    import time
    end = time.monotonic() + 30
    while time.monotonic() < end and subprocess.run(
            ["pidof", "multipathd"], capture_output=True).returncode == 0:
        time.sleep(0.2)
    # the wwids a greedy multipathd recorded make udev's "multipath -u" mark the same
    # namespaces as multipath paths in every later test, multipathd or not: the VM goes back
    # to a host that never ran it
    for conf in (MULTIPATH_CONF, MULTIPATH_DROPIN, MULTIPATH_WWIDS, MULTIPATH_BINDINGS):
        if os.path.exists(conf):
            os.unlink(conf)
    shutil.rmtree("/run/multipath/find_multipaths", ignore_errors=True)


def dm_tables():
    out = {}
    for dm in sorted(d for d in os.listdir("/sys/block") if d.startswith("dm-")):
        name = Path("/sys/block/%s/dm/name" % dm).read_text().strip()
        uuid = Path("/sys/block/%s/dm/uuid" % dm).read_text().strip()
        table = subprocess.run(["dmsetup", "table", name], capture_output=True,
                               text=True).stdout.strip()
        out[name] = {"uuid": uuid, "table": table, "dev": dm}
    return out


def dm_path_states(name):
    out = subprocess.run(["dmsetup", "status", name], capture_output=True, text=True).stdout
    words = out.split()
    return {w: words[i + 1] for i, w in enumerate(words[:-1])
            if re.fullmatch(r"\d+:\d+", w) and words[i + 1] in ("A", "F")}


def clear_registry():
    import shutil
    left = sorted(os.listdir(os.path.join(REGISTRY, "volumes"))) if os.path.isdir(
        os.path.join(REGISTRY, "volumes")) else []
    for sub in ("volumes", "refs", "secrets"):
        shutil.rmtree(os.path.join(REGISTRY, sub), ignore_errors=True)
    return left


def secret_files(needle: str) -> dict:
    out = {}
    base = os.path.join(REGISTRY, "secrets")
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        path = os.path.join(base, name)
        st = os.stat(path)
        with open(path) as f:
            holds = needle in f.read()
        out[name] = {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "holds": holds}
    dir_st = os.stat(base) if os.path.isdir(base) else None
    return {"dir_mode": dir_st and dir_st.st_mode & 0o7777, "files": out}


class SecretWatch:
    """A thread scanning /proc/*/cmdline and /proc/*/environ for strings, over and over."""

    def __init__(self, needles):
        self.needles = [n.encode() for n in needles]
        self.scans = 0
        self.seen: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="secret-watch")
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue        # the agent itself holds the needle, in memory only
                for name in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{name}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    if any(n in data for n in self.needles):
                        self.seen.add(f"{pid} {_comm(pid)} {name}")
            self.scans += 1
            self._stop.wait(0.002)     # let the attach run on a 2-core TCG guest

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        dmesg = subprocess.run(["dmesg"], capture_output=True).stdout
        return {"scans": self.scans, "seen": sorted(self.seen),
                "kernel_log": any(n in dmesg for n in self.needles)}


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def kill_process(pid: int) -> bool:
    pid = int(pid)
    if pid <= 1 or pid == os.getpid():
        raise ValueError(f"will not kill pid {pid}")
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return False
    return True


def two_path_volume(target, nqn, uuid, size_mb=64):
    """A subsystem with one namespace on ports 4420 (ANA optimized) and 4421 (non-optimized).

    ``target`` is a Target or a TargetClient (same method names).
    """
    target.add_subsystem(nqn)
    target.add_namespace(nqn, 1, size_mb, uuid, ana_group=1)
    for port, svc in ((1, 4420), (2, 4421)):
        target.add_port(port, svc)
        target.link(port, nqn)
    target.set_ana_state(1, 1, "optimized")
    target.set_ana_state(2, 1, "non-optimized")


# ---------------------------------------------------------------- agent / client

#: Target methods the agent serves.
AGENT_OPS = ("add_subsystem", "allow_host", "set_host_keys", "auth_supported", "secret_files",
             "watch_secret", "watch_secret_result", "add_namespace", "resize_namespace",
             "remove_namespace", "add_port", "link", "unlink", "set_ana_state", "state",
             "teardown", "cleanup_initiator", "kill_process", "mount_scratch",
             "umount_scratch", "hold_exclusive", "release_exclusive", "clear_registry",
             "rdma", "drop_port", "undrop_ports", "stop_subsystem", "start_subsystem",
             "start_multipathd", "stop_multipathd", "multipathd_show", "dm_tables",
             "dm_status", "cinder")


class TargetAgent:
    """Root-side JSON-over-unix-socket server so a non-root test can change the target.

    One JSON object per line: ``{"op": ..., "args": [...], "kwargs": {...}}`` ->
    ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
    """

    def __init__(self, target: Target, sock_path: str, mode: int = 0o666):
        self.target = target
        self.sock_path = sock_path
        self._lock = threading.Lock()
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    reply = agent.dispatch(line)
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        if os.path.exists(sock_path):
            os.unlink(sock_path)
        os.makedirs(os.path.dirname(sock_path) or ".", exist_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(sock_path, Handler)
        self.server.daemon_threads = True
        os.chmod(sock_path, mode)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="target-agent")

    def dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if req.get("op") not in AGENT_OPS:
                raise ValueError(f"unknown op {req.get('op')!r}")
            with self._lock:
                result = getattr(self.target, req["op"])(*req.get("args", []),
                                                         **req.get("kwargs", {}))
            return {"ok": True, "result": result}
        except Exception as exc:  # the client re-raises it; the agent keeps serving
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def start(self) -> "TargetAgent":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class TargetError(RuntimeError):
    """A target operation failed in the agent."""


class TargetClient:
    """Same methods as :class:`Target`, forwarded to a :class:`TargetAgent`."""

    def __init__(self, sock_path: str | None = None, timeout: float = 60):
        self.sock_path = sock_path or os.environ["NVMEOF_MP_TARGET_SOCK"]
        self.timeout = timeout

    def _call(self, op: str, *args, **kwargs):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.sock_path)
            sock.sendall(json.dumps({"op": op, "args": args, "kwargs": kwargs}).encode()
                         + b"\n")
            reply = json.loads(sock.makefile("rb").readline())
        if not reply["ok"]:
            raise TargetError(f"{op}: {reply['error']}")
        return reply["result"]

    def __getattr__(self, name):
        if name not in AGENT_OPS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

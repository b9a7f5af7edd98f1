"""nvmet (kernel NVMe-oF target) driven through configfs (guest side).

Runs as root inside the lab VM; stdlib only so it starts fast under TCG.  Tests that run
the connector as the unprivileged lab user cannot write configfs, so the root process
starts :class:`.agent.TargetAgent` and the tests drive the target with
:class:`.agent.TargetClient` (socket path in ``$NVMEOF_MP_TARGET_SOCK``).  What the agent
also does on the initiator side (multipathd, dm, md, the registry, Cinder) is
:mod:`.initiator`.

Kernel facts this encodes (nvmet, Linux 6.1):
- a tmpfs-backed namespace needs ``buffered_io=1`` before ``enable`` (no O_DIRECT on tmpfs);
- unlinking the last subsystem from a port closes its listener (ECONNREFUSED): a realistic
  "path down"; re-linking brings it back;
- ANA group 1 always exists on every port; other groups must be created per port before a
  namespace can use them;
- rdma ports (``trtype="rdma"``) need soft-RoCE on a non-loopback address: :meth:`Target.rdma`.
"""

import os
import re
import subprocess
from pathlib import Path

from .initiator import InitiatorOps, write_attr as _write

CONFIGFS = Path("/sys/kernel/config/nvmet")
#: what ``Target.rdma`` found, once per VM (the rxe link outlives a Target)
_RDMA = None
ANA_STATES = ("optimized", "non-optimized", "inaccessible", "persistent-loss", "change")


class Target(InitiatorOps):
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

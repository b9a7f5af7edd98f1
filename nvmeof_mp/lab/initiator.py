"""The initiator side of the lab VM, as root, for tests that run as the lab user: clean-up
after a failed test, the attachment registry, things that hold a device, secret scans and
killing a process (served by :class:`.agent.TargetAgent` through :class:`InitiatorOps`).
"""

import os
import shutil
import subprocess
import threading
from pathlib import Path

from nvmeof_mp.names import STATE_DIR

from . import multipath


def write_attr(path: Path, value) -> None:
    """A sysfs/configfs attribute write, newline-terminated."""
    path.write_text(f"{value}\n")


class InitiatorOps:
    """The agent's initiator-side operations, mixed into :class:`.target.Target` so one
    object serves them all; needs ``self._held`` (a list) set by the owner."""

    # -- multipathd alongside (tests/gate/test_gate_multipathd.py) ---------------------------
    def start_multipathd(self, greedy: bool = False, dropin: bool = False) -> str:
        """multipathd with Debian's default configuration (no /etc/multipath.conf), or with
        ``find_multipaths greedy``; with ``dropin`` the project's multipath drop-in
        (etc/multipath/conf.d) installed too.  Returns its version line."""
        return multipath.start_multipathd(greedy, dropin)

    def stop_multipathd(self) -> None:
        multipath.stop_multipathd()

    def multipathd_show(self, what: str = "maps") -> str:
        if what not in ("maps", "paths", "config"):
            raise ValueError(what)
        return multipath.multipathd("show", what)

    def dm_status(self, name: str) -> dict:
        """The kernel's view of a dm-multipath map's paths (``dmsetup status``, root only):
        {"major:minor": "A" or "F"}; {} for a map that does not exist."""
        return multipath.dm_path_states(name)

    def dm_tables(self) -> dict:
        """Every dm map: name -> {"uuid": .., "table": ..}."""
        return multipath.dm_tables()

    # -- Cinder's LVM driver beside the target (tests/gate/test_gate_cinder.py) ------------
    def cinder(self, op: str, **kwargs):
        """``op`` of the Cinder worker (:mod:`.cinder`), started as root on first use."""
        from . import cinder
        return cinder.request(op, **kwargs)

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
            write_attr(Path("/sys/class/nvme") / ctrl / "delete_controller", 1)
            done.append(ctrl)
        except OSError:
            pass
    return done


REGISTRY = "/" + STATE_DIR
SCRATCH_MOUNT = "/run/nvmeof-lab/scratch"


def clear_registry():
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

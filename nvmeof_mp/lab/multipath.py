"""multipathd and dm-multipath beside the library in the lab VM (as root): start/stop
multipathd with a given configuration, and the kernel's view of dm maps."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

MULTIPATH_CONF = "/etc/multipath.conf"
MULTIPATH_WWIDS = "/etc/multipath/wwids"
MULTIPATH_BINDINGS = "/etc/multipath/bindings"
MULTIPATH_DROPIN = "/etc/multipath/conf.d/nvmeof-mp.conf"


def multipathd(*args) -> str:
    return subprocess.run(["multipathd", *args], capture_output=True, text=True,
                          timeout=30).stdout


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
    end = time.monotonic() + 30
    while time.monotonic() < end:       # lab helper: the daemon answers on its socket once up
        out = multipathd("show", "daemon")
        if "running" in out or "idle" in out:
            break
        time.sleep(0.2)
    return multipathd("show", "daemon").strip()


def stop_multipathd():
    subprocess.run(["multipathd", "shutdown"], capture_output=True, timeout=30)
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

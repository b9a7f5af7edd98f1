"""Cinder's own LVM driver and nvmet target helper in the lab (the LVM-NVMeoF job, issue 16).

Three parts, one concern: run real Cinder code next to the lab target.

* Host side, :func:`ensure_venv`: a virtualenv under the lab cache with ``cinder`` from PyPI
  and the ``nvmet`` module of Debian's ``nvmetcli`` package (unpacked with ``dpkg -x`` from
  the suite the lab already reads kernels from; Cinder's nvmet target helper imports it).
* Guest side, root, in the target agent, :func:`worker`: starts the worker below once per VM
  and forwards JSON requests to it (``TargetClient().cinder(op, **kwargs)``).
* Guest side, root, in the Cinder venv: :mod:`.cinder_worker`, Cinder's ``LVMVolumeDriver``
  behind a JSON pipe.

The project is on the worker's path through ``PYTHONPATH`` (the lab sets it in the guest).
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import paths

CINDER = "cinder==29.0.0"
#: Debian package with the ``nvmet`` Python module (architecture all); only sid has 0.9
NVMETCLI = "nvmetcli"
NVMETCLI_SUITE = "sid"
#: environment variable naming the Cinder venv's python in the guest
PYTHON_ENV = "NVMEOF_MP_CINDER_PYTHON"
_READY = ".nvmeof-mp-ready"


# ---------------------------------------------------------------- host side

def venv_dir() -> Path:
    return paths.lab_dir() / "cinder-venv"


def ready_python() -> Path | None:
    """The Cinder venv's python if the venv is complete, else None."""
    venv = venv_dir()
    return venv / "bin" / "python" if (venv / _READY).exists() else None


def fetch_nvmetcli() -> Path:
    """Debian's nvmetcli unpacked in the lab cache; returns the dir holding ``nvmet/``."""
    from .kernel import SUITES, AptSource, LabError
    root = paths.lab_dir() / "nvmetcli"
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    if (site / "nvmet" / "nvme.py").exists():
        return site
    version = next(v for v, suite in SUITES.items() if suite == NVMETCLI_SUITE)
    source = AptSource(version)     # the lab's private apt configuration of that suite
    with tempfile.TemporaryDirectory(dir=paths.lab_dir()) as work:
        try:
            deb = source.download(NVMETCLI, Path(work))
        except LabError:
            source._update()        # lists of the suite not fetched yet
            deb = source.download(NVMETCLI, Path(work))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return site


def ensure_venv() -> Path:
    """The Cinder venv (made once): cinder from PyPI + nvmetcli's ``nvmet``; its python."""
    python = ready_python()
    if python:
        return python
    venv = venv_dir()
    python = venv / "bin" / "python"
    print(f"lab: installing {CINDER} into {venv}", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    CINDER], check=True)
    nvmet = fetch_nvmetcli()
    for site in glob.glob(str(venv / "lib" / "python3*" / "site-packages")):
        Path(site, "nvmetcli.pth").write_text(f"{nvmet}\n")
    (venv / _READY).write_text(CINDER + "\n")
    return python


def guest_env() -> dict:
    """What the guest needs to find the Cinder venv (empty if it is not built)."""
    python = ready_python()
    return {PYTHON_ENV: str(python)} if python else {}


# ---------------------------------------------------------------- guest side: the client

class WorkerError(RuntimeError):
    """A Cinder operation failed in the worker."""


class Worker:
    """The Cinder worker process and its request pipe (one request at a time)."""

    def __init__(self, python: str, log_path: str):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [python, "-m", "nvmeof_mp.lab.cinder_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, env=dict(os.environ))
        self._lock = threading.Lock()

    def call(self, op: str, **kwargs):
        with self._lock:
            if self.proc.poll() is not None:
                raise WorkerError(f"cinder worker exited rc={self.proc.returncode}")
            self.proc.stdin.write(json.dumps({"op": op, "kwargs": kwargs}).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{op}: cinder worker died (rc={self.proc.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(f"{op}: {reply['error']}")
        return reply["result"]


_WORKER = None
_WORKER_LOCK = threading.Lock()


def request(op: str, **kwargs):
    """``op`` of the worker; ``start`` only starts it (its imports then overlap whatever the
    caller does next: under TCG they take a minute and more)."""
    w = worker()
    return True if op == "start" else w.call(op, **kwargs)


def worker() -> Worker:
    """The worker of this VM, started on first use (Cinder's imports take seconds)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            python = os.environ.get(PYTHON_ENV) or (ready_python() and str(ready_python()))
            if not python:
                raise WorkerError("no Cinder venv: run 'nvmeof-mp lab cinder' on the host")
            out = os.environ.get("NVMEOF_MP_LAB_OUT") or tempfile.gettempdir()
            _WORKER = Worker(python, os.path.join(out, "cinder-worker.log"))
        return _WORKER

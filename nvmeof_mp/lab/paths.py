"""Where the lab keeps things, derived from the running interpreter and checkout.

Nothing here is machine specific: the cache lives under ``$NVMEOF_MP_LAB_DIR`` or the XDG
cache dir, and the project/venv are found from this file and ``sys.prefix`` because the
guest mounts the host root at ``/`` and therefore sees them at the very same paths.
"""

import os
import sys
from pathlib import Path


def lab_dir() -> Path:
    """Cache dir for the kernel, initramfs and run outputs (created on demand)."""
    env = os.environ.get("NVMEOF_MP_LAB_DIR")
    if env:
        path = Path(env)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(cache) / "nvmeof-mp-lab"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir() -> Path:
    """The ``nvmeof_mp/lab`` directory (guest scripts ship here)."""
    return Path(__file__).resolve().parent


def project_dir() -> Path:
    """Checkout root (the dir holding ``nvmeof_mp/`` and ``etc/``)."""
    return package_dir().parents[1]


def venv_dir() -> Path:
    """The virtualenv the lab runs from; the guest runs the very same one."""
    return Path(sys.prefix).resolve()


def venv_python() -> Path:
    """Interpreter to use in the guest (the venv's, never a pyenv shim: shims cost seconds)."""
    exe = venv_dir() / "bin" / "python3"
    return exe if exe.exists() else Path(sys.executable)


def rootwrap_exe() -> Path:
    """``nvmeof-mp-rootwrap`` console script (oslo.rootwrap's main, see pyproject)."""
    return venv_dir() / "bin" / "nvmeof-mp-rootwrap"

"""The privsep context of nvmeof_mp.

Every root action runs in a daemon started through ``privsep-helper`` with the root helper
or by ``[nvmeof_mp_privileged] helper_command`` with the sudoers rule in
``etc/sudoers.d/nvmeof_mp``, the one configuration that lets the service user start this
context and no other (rootwrap always allows ``privsep-helper`` with any arguments).
Entrypoints live in the sibling modules; each does one narrow thing and validates its
arguments again inside the daemon.
"""

import threading

from oslo_config import cfg
from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

CONTEXT_NAME = "nvmeof_mp.privileged.default"

default = priv_context.PrivContext(
    "nvmeof_mp",
    cfg_section="nvmeof_mp_privileged",
    pypath=CONTEXT_NAME,
    # The daemon stays uid 0, and every file it opens is root's (/dev/nvme-fabrics, sysfs
    # attributes, /etc/nvme, the DMI UUID, block devices, /run/mdadm), so owner permissions
    # suffice: no DAC_OVERRIDE, DAC_READ_SEARCH or FOWNER.  What is left:
    #  - CAP_SYS_ADMIN: creating fabrics controllers (/dev/nvme-fabrics), BLKFLSBUF, the
    #    device-mapper and md ioctls that dmsetup and mdadm make;
    #  - CAP_MKNOD: mdadm and ``dmsetup mknodes`` make /dev/md/* and /dev/mapper/* nodes on
    #    hosts without udev.
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_MKNOD],
)

# oslo.privsep runs as many calls at once as the host has CPUs.  A connect can block for the
# kernel's connect timeout on a dead portal; with two CPUs two such calls would hold back
# every flush and controller delete of other volumes.  The daemon imports this module too,
# so the default applies on both sides (a config file may still set it).
DAEMON_THREADS = 32
cfg.CONF.set_default("thread_pool_size", DAEMON_THREADS, group="nvmeof_mp_privileged")

_fork_when_root = False
_start_lock = threading.Lock()


def init(root_helper=None):
    """Set the root helper used to start the daemon (the first privileged call starts it).

    Without a root helper a process that is already root forks the daemon itself instead
    of looking for ``privsep-helper`` through sudo's secure PATH.
    """
    global _fork_when_root
    import os
    import shlex
    if root_helper:
        helper = shlex.split(root_helper) if isinstance(root_helper, str) else list(root_helper)
        priv_context.init(root_helper=helper)
        _fork_when_root = False
    else:
        _fork_when_root = os.getuid() == 0


def ensure_started():
    """Start the daemon ourselves when we are root and no root helper was given (by forking,
    or under eventlet as a new interpreter, see ``_start_fresh``); also after that daemon
    died (oslo.privsep would restart it through the root helper)."""
    if not _fork_when_root:
        return
    channel = default.channel
    if channel is not None and channel.running:
        return
    with _start_lock:
        if default.channel is not None and not default.channel.running:
            default.stop()          # the daemon died: its calls failed with an OSError
        if default.channel is None:
            if _green():
                _start_fresh()
            else:
                default.start(priv_context.Method.FORK)


def _green():
    """Is this process monkey-patched by eventlet (nova-compute, cinder-volume)?"""
    import sys
    eventlet = sys.modules.get("eventlet")
    return bool(eventlet) and eventlet.patcher.is_monkey_patched("thread")


def _start_fresh():
    """Start the daemon as a new interpreter (``privsep-helper`` run directly: we are root).

    Not a fork: under eventlet a forked child keeps every greenthread of the caller, and the
    daemon would go on running the caller's attaches as soon as it waits for a request.
    """
    import os
    import shlex
    import shutil
    import sys
    beside = os.path.join(os.path.dirname(sys.executable), "privsep-helper")   # our install
    helper = beside if os.access(beside, os.X_OK) else shutil.which("privsep-helper")
    cfg.CONF.set_override("helper_command", shlex.quote(helper), group="nvmeof_mp_privileged")
    default.start(priv_context.Method.ROOTWRAP)


# Import every entrypoint module with the context, so the daemon loads them while it starts
# and the first attach after start pays no import (under emulation ~0.5 s).
from nvmeof_mp.privileged import host, nvme, registry, storage  # noqa: E402,F401

"""Soft-RoCE (rdma_rxe) inside the lab VM, so the gate can run NVMe over RDMA (root only).

The VM has no network card.  rxe does not work on ``lo`` or a 127.0.0.0/8 address (route
resolution times out), but it does on a dummy netdev carrying a link-local address: nothing
leaves the VM, and nvmet-rdma and nvme-rdma meet on that address.

:func:`setup` loads the modules, creates the netdev and the rxe link (idempotent) and returns
``(address, None)``, or ``(None, reason)`` when this kernel or userland cannot do RDMA.  The
root target agent runs it on a test's first request (``Target.rdma``), so VM runs without an
rdma test do not pay for loading the RDMA stack.
"""

import os
import shutil
import subprocess

NETDEV = "rdma0"
RXE = "rxe0"
ADDRESS = "169.254.77.1"
MODULES = ("ib_core", "rdma_cm", "rdma_rxe", "nvme_rdma", "nvmet_rdma", "dummy")


def _run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def setup(address: str = ADDRESS):
    """Soft-RoCE on a dummy netdev with ``address``; ``(address, None)`` or ``(None, why)``."""
    for tool in ("modprobe", "ip", "rdma"):
        if not shutil.which(tool):
            return None, "%s not installed" % tool
    for module in MODULES:
        rc, out = _run(["modprobe", module])
        if rc:
            return None, "modprobe %s: %s" % (module, out or rc)
    if not os.path.exists("/sys/class/net/" + NETDEV):
        for argv in (["ip", "link", "add", NETDEV, "type", "dummy"],
                     ["ip", "addr", "add", address + "/32", "dev", NETDEV]):
            rc, out = _run(argv)
            if rc:
                return None, "%s: %s" % (" ".join(argv), out)
    rc, out = _run(["ip", "link", "set", NETDEV, "up"])
    if rc:
        return None, "ip link set %s up: %s" % (NETDEV, out)
    if not os.path.exists("/sys/class/infiniband/" + RXE):
        rc, out = _run(["rdma", "link", "add", RXE, "type", "rxe", "netdev", NETDEV])
        if rc:
            return None, "rdma link add %s: %s" % (RXE, out)
    return address, None

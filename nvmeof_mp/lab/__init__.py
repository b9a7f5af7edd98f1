"""Real-kernel lab: boot a Debian kernel in qemu (TCG) with an nvmet target.

The development machines' kernels have no NVMe support and cannot load modules, so tests
that need the real nvme-tcp initiator, nvmet target, dm-multipath or md run inside a small
VM whose root file system is the host's own root (read-only 9p + tmpfs overlay).  That way
the project's checkout, its virtualenv and the host's nvme-cli/mdadm/multipath-tools are
used unchanged inside the guest.

Host side: :mod:`nvmeof_mp.lab.vm` (tools, kernel, ``run_in_vm``).
Guest side (root, stdlib only): :mod:`nvmeof_mp.lab.target` (nvmet configfs),
:mod:`nvmeof_mp.lab.agent` (its socket agent and client), :mod:`nvmeof_mp.lab.initiator` and
:mod:`nvmeof_mp.lab.multipath` (the initiator side as root), :mod:`nvmeof_mp.lab.guest`.
Command line: ``python -m nvmeof_mp.lab {prepare,shell,smoke,guest-run}``.
"""

#: Non-root user the guest creates; tests run the connector as this user.
LAB_USER = "nvmeof"
#: Where the guest writes the rootwrap configuration (mirrors a real deployment).
ROOTWRAP_CONF = "/etc/nvmeof_mp/rootwrap.conf"
ROOTWRAP_FILTERS_DIR = "/etc/nvmeof_mp/rootwrap.d"

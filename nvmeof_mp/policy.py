"""Timeout policy for fabrics controllers, chosen per attach mode.

``ctrl_loss_tmo`` is -1 by default, as os-brick has it since its bug 1964385: a lost controller
is reconnected forever, so a volume survives a target outage of any length (an array upgrade)
instead of vanishing under a running VM when the kernel gives the controller up.  A short
``reconnect_delay`` uses a returning path again within seconds.  ``fast_io_fail_tmo`` is set on
replica legs (md, dm-multipath) so I/O on a lost leg fails over in about a second instead of
queueing; a single path, or native multipath, keeps queueing: there the kernel itself requeues
I/O on another path, and failing I/O fast on the only path would hurt the VM.

The policy is written as is onto controllers an attach creates.  Controllers it reuses (made
by an earlier attach, another volume or another tool) are only ever moved towards longer
timeouts (``plan.attr_updates``).  doc/source/timeouts.rst explains the trade-off.
"""

from __future__ import annotations

import dataclasses

# When is a new block device handed out?  "always": once udev processed it (mode, group,
# /dev/disk links); "never": as soon as the kernel shows it; "auto": once udev processed it,
# or earlier when the calling process can already open it (root, typically) - except replica
# legs, which always wait so udev's own md assembly cannot race with ours.  In every mode a
# namespace that is not a native multipath head waits for udev's database while udev runs
# (multipathd's claim, ``claims.check``).
UDEV_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class TimeoutPolicy:
    ctrl_loss_tmo: int | None = -1            # reconnect forever (os-brick's choice)
    reconnect_delay: int | None = 2
    keep_alive_tmo: int | None = None
    nr_io_queues: int | None = None
    fast_io_fail_tmo: int | None = None     # single / native multipath
    leg_fast_io_fail_tmo: int | None = 1     # RAID and DeviceMapper legs
    device_timeout: float = 30.0             # how long to wait for the block device
    ana_wait: float = 1.0                    # how long to wait for an optimized path
    wait_for_udev: str = "auto"              # see UDEV_MODES
    flush_timeout: float = 30.0              # a detach's flush gives up after this long

    def __post_init__(self):
        mode = {True: "always", False: "never"}.get(self.wait_for_udev, self.wait_for_udev)
        if mode not in UDEV_MODES:
            raise ValueError("wait_for_udev must be one of %s, not %r"
                             % (", ".join(UDEV_MODES), self.wait_for_udev))
        object.__setattr__(self, "wait_for_udev", mode)

    def controller_options(self, replica_leg: bool, fast_io_fail: bool = True):
        """The fabrics options of a new controller.  ``fast_io_fail``: the kernel takes
        ``fast_io_fail_tmo`` (Linux >= 5.11).  Without it a replica leg that should fail fast
        gets a short ``ctrl_loss_tmo`` instead (``leg_fast_io_fail_tmo``, at least one
        ``reconnect_delay``): its I/O fails when the kernel gives the lost controller up, and
        heal reconnects the leg, rather than the whole array queueing forever on it."""
        fast = self.leg_fast_io_fail_tmo if replica_leg else self.fast_io_fail_tmo
        loss = self.ctrl_loss_tmo
        if not fast_io_fail:
            if replica_leg and fast is not None and fast >= 0:
                bound = max(fast, self.reconnect_delay or 1)
                loss = bound if loss is None or loss < 0 else min(loss, bound)
            fast = None
        opts = {"ctrl_loss_tmo": loss, "reconnect_delay": self.reconnect_delay,
                "keep_alive_tmo": self.keep_alive_tmo, "nr_io_queues": self.nr_io_queues,
                "fast_io_fail_tmo": fast}
        return {k: v for k, v in opts.items() if v is not None}

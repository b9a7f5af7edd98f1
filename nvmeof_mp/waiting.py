"""Waiting on the kernel: short adaptive polling under a deadline, never a fixed sleep.

The clock is an interface so the simulated host can run "time" forward instantly.
"""

from __future__ import annotations

import time


class Clock:
    """Real time."""

    def monotonic(self):
        return time.monotonic()

    def sleep(self, seconds):
        time.sleep(seconds)


def poll(check, timeout, clock=None, first=0.005, longest=0.05):
    """Call ``check()`` until it returns something truthy or ``timeout`` seconds pass.

    Returns the last value of ``check()`` (falsy on timeout).  The interval starts at ``first``
    and grows by half each round up to ``longest``: a device that appears in 20 ms is seen in
    ~20 ms, a slow one costs at most twenty small sysfs scans a second.
    """
    clock = clock or Clock()
    deadline = clock.monotonic() + timeout
    interval = first
    while True:
        value = check()
        if value:
            return value
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            return value
        clock.sleep(min(interval, remaining))
        interval = min(interval * 1.5, longest)

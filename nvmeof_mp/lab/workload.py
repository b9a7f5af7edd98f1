"""Direct I/O with known patterns, timing every request (gate tests and the demo).

Every block written is remembered with its pattern, so after a path failure every checksum can
be verified; every request is timed, so the longest I/O stall is known.
"""

import hashlib
import mmap
import os
import threading
import time

BLOCK = 64 * 1024


def pattern(seq):
    seed = hashlib.sha256(b"nvmeof_mp-%d" % seq).digest()
    return (seed * (BLOCK // len(seed)))[:BLOCK]


class Writer(threading.Thread):
    """Writes block ``i`` with pattern(seq) in a loop over ``blocks`` blocks; records latencies.

    Keeps what each block should hold, so every checksum can be verified afterwards.
    """

    def __init__(self, device, blocks=256):
        super().__init__(daemon=True)
        self.device, self.blocks = device, blocks
        self.expected = {}
        self.max_stall = 0.0
        self.errors = []
        self.ops = 0
        self._halt = threading.Event()

    def run(self):
        buf = mmap.mmap(-1, BLOCK)
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            self.errors.append("open %s: %s" % (self.device, e))
            return
        try:
            seq, tried = 0, False
            # at least one write, however soon stop() comes: an open that waited (md busy
            # failing a leg) must not turn into "nothing written, nothing failed"
            while not tried or not self._halt.is_set():
                tried = True
                block = seq % self.blocks
                buf.seek(0)
                buf.write(pattern(seq))
                t = time.monotonic()
                try:
                    os.pwrite(fd, buf, block * BLOCK)
                except OSError as e:
                    self.errors.append("block %d: %s" % (block, e))
                    continue
                finally:
                    self.max_stall = max(self.max_stall, time.monotonic() - t)
                self.expected[block] = seq
                self.ops += 1
                seq += 1
        finally:
            os.close(fd)

    def stop(self):
        self._halt.set()
        self.join(120)


def write_for(device, seconds=1.0, blocks=64):
    """Write patterns to ``device`` for ``seconds``; every write must work.  Returns what each
    block holds (for ``verify``)."""
    w = Writer(device, blocks=blocks)
    w.start()
    time.sleep(seconds)
    w.stop()
    assert not w.errors and w.ops > 0, w.errors[:5]
    return w.expected


def verify(device, expected):
    """Read every written block back with direct I/O; returns the list of mismatches."""
    buf = mmap.mmap(-1, BLOCK)
    bad = []
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for block, seq in sorted(expected.items()):
            os.preadv(fd, [buf], block * BLOCK)
            if bytes(buf) != pattern(seq):
                bad.append(block)
    finally:
        os.close(fd)
    return bad


def native_multipath():
    from nvmeof_mp.hostinfo import HostInfo
    return HostInfo().native_multipath()


def wait_for(check, timeout, interval=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return check()

"""Reading a block device without hanging the caller (the same code runs in the daemon)."""

from __future__ import annotations

import os

from nvmeof_mp import threads

# A read of a device whose paths are all away queues until one returns (ctrl_loss_tmo -1,
# queue_if_no_path): the answer "not valid now" is given after this long instead.
READ_TIMEOUT = 10.0


def read_first_sector(path, timeout=None):
    """None when the first 512 bytes of ``path`` can be read within ``timeout`` seconds
    (``READ_TIMEOUT`` by default), else a text saying why not."""
    timeout = READ_TIMEOUT if timeout is None else timeout

    def read():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.read(fd, 512)
        finally:
            os.close(fd)
    try:
        finished, _ = threads.run_with_deadline(read, timeout, "read")
    except OSError as e:
        return "%s: %s" % (path, e.strerror)
    if not finished:
        return "%s: no answer within %ss (no usable path?)" % (path, timeout)
    return None

"""Reading sysfs/proc files: whole files, whatever size the kernel hands out per read."""

import os
import threading
import time

from nvmeof_mp.topology import read_attr


def test_read_attr_reads_on_until_end_of_file_after_short_reads(tmp_path):
    """/proc files give about a page per read; a short read is not the end of the file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_in_pieces():
        with open(fifo, "wb", buffering=0) as f:
            f.write(b"first line\n")
            time.sleep(0.05)
            f.write(b"second line\n")
    writer = threading.Thread(target=write_in_pieces)
    writer.start()
    assert read_attr(str(fifo)) == "first line\nsecond line"
    writer.join(5)


def test_read_attr_of_a_missing_file_is_none(tmp_path):
    assert read_attr(str(tmp_path / "missing")) is None
    assert read_attr(str(tmp_path)) is None       # a directory cannot be read

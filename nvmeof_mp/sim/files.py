"""File helpers of the simulated host's tree."""

import os


def write(path, value):
    """Write a sysfs-like attribute (a line ending in a newline), making parents."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(value if value.endswith("\n") else value + "\n")


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

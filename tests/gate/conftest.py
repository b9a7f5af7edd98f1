"""Gate suite: runs INSIDE the lab VM against the real kernel (see doc/source/lab.rst).

The test process is the unprivileged lab user; root actions go through the real privsep
daemon started by ``$NVMEOF_MP_ROOT_HELPER`` (sudo + our rootwrap filter).  The nvmet target is
driven through the root target agent at ``$NVMEOF_MP_TARGET_SOCK``.
"""

import os

import pytest

from nvmeof_mp.lab.workload import native_multipath

IN_LAB = bool(os.environ.get("NVMEOF_MP_TARGET_SOCK"))


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gate)
            if not IN_LAB:
                item.add_marker(pytest.mark.skip(reason="gate tests run in the lab VM"))
            for mark, wanted in (("native", True), ("no_native", False)):
                if item.get_closest_marker(mark) and native_multipath() != wanted:
                    item.add_marker(pytest.mark.skip(
                        reason="needs nvme_core multipath=%s" % ("Y" if wanted else "N")))


def pytest_configure(config):
    config.addinivalue_line("markers", "native: needs nvme_core multipath=Y")
    config.addinivalue_line("markers", "no_native: needs nvme_core multipath=N")


@pytest.fixture
def target():
    from nvmeof_mp.lab.target import TargetClient
    client = TargetClient()
    client.teardown()
    yield client
    client.teardown()


@pytest.fixture(scope="session")
def connector():
    from nvmeof_mp.connector import NVMeOFConnector
    assert os.getuid() != 0, "the gate drives the connector as a non-root user"
    return NVMeOFConnector(root_helper=os.environ["NVMEOF_MP_ROOT_HELPER"],
                           use_multipath=True)


@pytest.fixture
def no_leftovers():
    """After the test: no controller, md array or dm map of ours is left behind.

    What a failed test leaves is cleaned up (by the root agent) before this fails, so the
    next test starts from a clean host instead of failing too.
    """
    yield
    left = os.listdir("/sys/class/nvme") if os.path.isdir("/sys/class/nvme") else []
    mds = [d for d in os.listdir("/sys/block") if d.startswith("md")]
    dms = [d for d in os.listdir("/sys/block") if d.startswith("dm-")]
    if left or mds or dms:
        from nvmeof_mp.lab.target import TargetClient
        TargetClient().cleanup_initiator()
    assert (left, mds, dms) == ([], [], []), "left behind: %s %s %s" % (left, mds, dms)

"""The main job, shown on the real kernel (runs in the lab VM as the non-root lab user).

Attach a 2-portal volume with native multipath, print the device and every path, fail one
path while I/O runs, show I/O continuing and the path healing, verify every block, detach.
"""

from __future__ import annotations

import os
import sys
import time

NQN = "nqn.2014-08.org.nvmeof-mp:demo"
UUID = "5b0b6f6e-3c1d-4d2e-9f10-2a3b4c5d6e7f"
T0 = time.monotonic()


def say(msg):
    print("[demo %6.2fs] %s" % (time.monotonic() - T0, msg), flush=True)


def show_paths(reader, target):
    from nvmeof_mp import status
    report = status.target_status(reader.snapshot([target.nqn]), target)
    for line in status.format_text(report).splitlines():
        print("            " + line, flush=True)
    return report


def main():
    from nvmeof_mp import connection
    from nvmeof_mp.connector import NVMeOFConnector
    from nvmeof_mp.lab.agent import TargetClient
    from nvmeof_mp.lab.target import two_path_volume
    from nvmeof_mp.lab.workload import Writer, verify, wait_for
    from nvmeof_mp.topology import SysfsReader

    say("running as uid %d; root actions go through %s" % (
        os.getuid(), os.environ.get("NVMEOF_MP_ROOT_HELPER")))
    target = TargetClient()
    two_path_volume(target, NQN, UUID)
    say("nvmet target ready: %s on 127.0.0.1:4420 (optimized) and :4421 (non-optimized)" % NQN)

    info = {"vol_uuid": UUID, "target_nqn": NQN,
            "portals": [["127.0.0.1", "4420", "tcp"], ["127.0.0.1", "4421", "tcp"]]}
    connector = NVMeOFConnector(root_helper=os.environ.get("NVMEOF_MP_ROOT_HELPER"),
                                use_multipath=True)
    props = connector.get_connector_properties(os.environ.get("NVMEOF_MP_ROOT_HELPER"))
    say("connector properties: nqn=%s native_multipath=%s" % (
        props.get("nqn"), props["nvme_native_multipath"]))
    t = time.monotonic()
    result = connector.connect_volume(info)
    say("attached %s in %.2fs (first call starts the privsep daemon)" % (
        result["path"], time.monotonic() - t))
    reader = SysfsReader()
    request = connection.parse(info)
    show_paths(reader, request.target)

    say("writing known patterns with O_DIRECT...")
    writer = Writer(result["path"])
    writer.start()
    time.sleep(2)
    say("FAILING path 4420: the target withdraws the subsystem from that port")
    target.unlink(1, NQN)
    time.sleep(1.5)
    show_paths(reader, request.target)
    ops = writer.ops
    time.sleep(2)
    say("I/O continues on the remaining path: %d writes in the last 2 s, errors: %d" % (
        writer.ops - ops, len(writer.errors)))
    say("restoring path 4420")
    target.link(1, NQN)
    healed = wait_for(lambda: show_quiet(reader, request.target) == "healthy", 30)
    show_paths(reader, request.target)
    say("path healed by the kernel (reconnect_delay=2): %s" % ("yes" if healed else "NO"))
    time.sleep(1)
    writer.stop()
    bad = verify(result["path"], writer.expected)
    for err in writer.errors[:3]:
        say("I/O error: %s" % err)
    say("%d writes, longest I/O stall %.2fs, I/O errors %d, blocks verified %d, bad %d" % (
        writer.ops, writer.max_stall, len(writer.errors), len(writer.expected), len(bad)))
    t = time.monotonic()
    connector.disconnect_volume(info, result)
    left = os.listdir("/sys/class/nvme")
    say("detached in %.2fs; controllers left: %s" % (time.monotonic() - t, left or "none"))
    target.teardown()
    ok = healed and not bad and not writer.errors and not left
    say("DEMO %s" % ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def show_quiet(reader, target):
    from nvmeof_mp import status
    return status.target_status(reader.snapshot([target.nqn]), target)["verdict"]


if __name__ == "__main__":
    sys.exit(main())

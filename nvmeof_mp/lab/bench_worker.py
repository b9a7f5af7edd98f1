"""One benchmark worker process: a long-lived connector of one library, driven over stdin.

Runs in the lab VM as root, under either this project's virtualenv (``--lib ours``) or
os-brick's own (``--lib osbrick``): it imports nothing of nvmeof_mp for os-brick, so the same
file serves both.  Each line on stdin is a JSON command, each reply a JSON line:

    {"op": "init"}                                  start the privsep daemon (cold cost)
    {"op": "attach", "infos": [...], "threads": N}  connect_volume for each, N at a time
    {"op": "detach", "infos": [...], "devices": [...], "threads": N}
    {"op": "quit"}

Replies carry wall time, per-volume times, privsep calls and processes forked (system-wide,
from /proc/stat) during the operation.
"""

import concurrent.futures
import json
import os
import sys
import threading
import time

CALLS = {"n": 0}
_lock = threading.Lock()


def _count_privsep_calls():
    from oslo_privsep import daemon

    real = daemon._ClientChannel.remote_call

    def counted(self, *args, **kwargs):
        with _lock:
            CALLS["n"] += 1
        return real(self, *args, **kwargs)
    daemon._ClientChannel.remote_call = counted


def forks():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("processes "):
                return int(line.split()[1])
    return 0


def make_connector(lib, root_helper):
    if lib.startswith("ours"):
        import dataclasses
        from nvmeof_mp import config
        from nvmeof_mp.connector import NVMeOFConnector
        policy = config.policy_from_conf()
        if lib == "ours-udev":      # what a caller that cannot open a fresh node waits
            policy = dataclasses.replace(policy, wait_for_udev="always")
        return NVMeOFConnector(root_helper=root_helper, use_multipath=True, policy=policy)
    from os_brick.initiator import connector
    return connector.InitiatorConnector.factory("NVMEOF", root_helper, use_multipath=True)


def warm_up(lib, conn, root_helper):
    if lib.startswith("ours"):
        conn.kernel.read_system_uuid()
    else:
        from os_brick.privileged import nvmeof as priv_nvmeof
        priv_nvmeof.get_system_uuid()


def measured(fn):
    CALLS["n"] = 0
    f0, t0 = forks(), time.monotonic()
    out = fn()
    return {"wall": time.monotonic() - t0, "privsep_calls": CALLS["n"],
            "forks": forks() - f0, "result": out}


def run_many(fn, items, threads):
    def timed(item):
        t = time.monotonic()
        value = fn(item)
        return time.monotonic() - t, value
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(timed, items))


def handle(lib, conn, root_helper, cmd):
    op, threads = cmd["op"], cmd.get("threads", 1)
    if op == "init":
        return measured(lambda: warm_up(lib, conn, root_helper))
    if op == "attach":
        reply = measured(lambda: run_many(conn.connect_volume, cmd["infos"], threads))
        reply["each"] = [t for t, _ in reply["result"]]
        reply["result"] = [r["path"] for _, r in reply["result"]]
        return reply
    if op == "detach":
        pairs = list(zip(cmd["infos"], cmd["devices"], strict=True))
        reply = measured(lambda: run_many(
            lambda p: conn.disconnect_volume(p[0], {"type": "block", "path": p[1]}),
            pairs, threads))
        reply["each"] = [t for t, _ in reply["result"]]
        reply["result"] = None
        return reply
    return {"error": "unknown op %s" % op}


def main():
    lib, root_helper = sys.argv[1], sys.argv[2]
    # os-brick's host-wide lock is an external oslo.concurrency lock: it needs a lock path
    os.environ.setdefault("OSLO_LOCK_PATH", "/run/nvmeof-bench-locks")
    os.makedirs(os.environ["OSLO_LOCK_PATH"], exist_ok=True)
    import shlex
    from oslo_privsep import priv_context
    priv_context.init(root_helper=shlex.split(root_helper))   # same for both libraries
    _count_privsep_calls()
    conn = make_connector(lib, root_helper)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            reply = handle(lib, conn, root_helper, cmd)
        except Exception as e:  # reported to the orchestrator, which fails the run
            reply = {"error": "%s: %s" % (type(e).__name__, e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

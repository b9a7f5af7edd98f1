"""A fresh connector process for the gate's safety tests (started by test_gate_safety.py).

    python gate_worker.py SCENARIO JSON_ARGS

It runs as whoever starts it: the lab user reaches root through ``$NVMEOF_MP_ROOT_HELPER``
(sudo + rootwrap), root gets no root helper and the library forks its privsep daemon, as in a
service that runs as root.  The last stdout line is ``RESULT <json>``; logs go to stderr.
The caller bounds the run with a timeout: a hang here is a failed test, not a stuck gate.
"""

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["green_pair"]:
    # As nova-compute and cinder-volume do: patch before anything else is imported.
    import eventlet
    eventlet.monkey_patch()

import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402


def connector():
    from nvmeof_mp.connector import NVMeOFConnector
    helper = None if os.getuid() == 0 else os.environ["NVMEOF_MP_ROOT_HELPER"]
    return NVMeOFConnector(root_helper=helper, use_multipath=True)


def check_block(path, seq):
    """Write one block with a known pattern at offset 0 and read it back (direct I/O)."""
    from nvmeof_mp.lab.workload import BLOCK, pattern
    out, back = mmap.mmap(-1, BLOCK), mmap.mmap(-1, BLOCK)
    out.write(pattern(seq))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, out, 0)
        os.preadv(fd, [back], 0)
    finally:
        os.close(fd)
    if bytes(back) != pattern(seq):
        raise AssertionError("%s: block read back differs from the block written" % path)


def controllers_of(nqns):
    found = []
    for name in sorted(os.listdir("/sys/class/nvme")):
        try:
            with open("/sys/class/nvme/%s/subsysnqn" % name) as f:
                if f.read().strip() in nqns:
                    found.append(name)
        except OSError:
            pass
    return found


def nqns_of(info):
    legs = info.get("volume_replicas") or info.get("dm_replicas") or [info]
    return {leg["target_nqn"] for leg in legs}


def back_to_back(args):
    """Attach the volumes one after the other, check a block on each, detach them."""
    conn = connector()
    paths = []
    for seq, info in enumerate(args["infos"]):
        t = time.monotonic()
        result = conn.connect_volume(info)
        print("attached %s in %.2fs" % (result["path"], time.monotonic() - t), file=sys.stderr)
        check_block(result["path"], seq)
        paths.append(result["path"])
    for info in args["infos"]:
        conn.disconnect_volume(info)
    return {"paths": paths}


def green_pair(args):
    """Greenthreads attach the volumes at once, then detach them at once (eventlet)."""
    import eventlet
    conn = connector()
    pool = eventlet.GreenPool()
    results = list(pool.imap(conn.connect_volume, args["infos"]))
    for seq, result in enumerate(results):
        check_block(result["path"], seq)
    list(pool.imap(conn.disconnect_volume, args["infos"]))
    return {"paths": [r["path"] for r in results]}


def killed_attach(args):
    """Attach ``slow`` (the caller kills the privsep daemon meanwhile), note what is left of
    it, then attach, check and detach ``after`` (the daemon must come back)."""
    conn = connector()
    out = {}
    t = time.monotonic()
    try:
        result = conn.connect_volume(args["slow"])
        out["slow"] = "attached %s" % result["path"]
        check_block(result["path"], 0)
        conn.disconnect_volume(args["slow"], result)
    except Exception as e:      # noqa: B902 - whatever it is, the caller judges it
        out["slow"] = "raised %s: %s" % (type(e).__name__, e)
    out["slow_seconds"] = round(time.monotonic() - t, 2)
    out["left"] = controllers_of(nqns_of(args["slow"]))
    try:
        result = conn.connect_volume(args["after"])
        check_block(result["path"], 1)
        conn.disconnect_volume(args["after"], result)
        out["after"] = "ok"
    except Exception as e:      # noqa: B902
        out["after"] = "raised %s: %s" % (type(e).__name__, e)
    return out


def dies_at(args):
    """Attach ``info`` and die by SIGKILL at ``phase``: "attach" right before the record says
    "attached" (every controller connected), "detach" right before the controllers are
    released (the record says "detaching", the device is flushed).  Nothing of the process
    runs after that: no undo, no finally, as when the OOM killer strikes."""
    import signal
    conn = connector()
    kernel = conn.kernel

    def die():
        print("dying now (%s)" % args["phase"], file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    put, release = kernel.registry_put, kernel.registry_release

    def put_then_maybe_die(key, record, secret_info=None):
        if args["phase"] == "attach" and record.get("state") == "attached":
            die()
        return put(key, record, secret_info)

    def maybe_die_then_release(*a, **kw):
        if args["phase"] == "detach":
            die()
        return release(*a, **kw)

    kernel.registry_put = put_then_maybe_die
    kernel.registry_release = maybe_die_then_release
    result = conn.connect_volume(args["info"])
    check_block(result["path"], 0)
    conn.disconnect_volume(args["info"], result)
    return {"survived": True}


def at_once(args):
    """Start the privsep daemon, make the file ``ready``, wait (bounded) for the file ``go``, then
    attach ``info``, check a block, detach: several of these started together attach at the
    same moment.  Returns the attach's start and end on CLOCK_MONOTONIC (one clock for every
    process of the host) and the device."""
    conn = connector()
    conn.kernel.read_system_uuid()                  # the daemon is up before "ready"
    with open(args["ready"], "w"):
        pass
    end = time.monotonic() + 60
    while not os.path.exists(args["go"]):
        if time.monotonic() > end:
            raise TimeoutError("no go after 60 s")
        time.sleep(0.01)
    start = time.monotonic()
    result = conn.connect_volume(args["info"])
    attached = time.monotonic()
    check_block(result["path"], args["seq"])
    conn.disconnect_volume(args["info"], result)
    return {"path": result["path"], "start": start, "attached": attached,
            "detached": time.monotonic()}


SCENARIOS = {f.__name__: f for f in (back_to_back, green_pair, killed_attach, dies_at,
                                     at_once)}


def main():
    import faulthandler
    # the caller kills a worker after WORKER_TIMEOUT (120 s): leave every thread's stack first
    faulthandler.dump_traceback_later(100, exit=False)
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    result = SCENARIOS[scenario](args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attach/detach cost of the connector itself, on the simulated host (not a test).

Prints, for 1, 2 and 4 portals and for 1..64 concurrent volumes: wall time per attach and
detach (the connector's own CPU cost: the simulated kernel answers instantly and waiting runs
on a fake clock) and privileged calls per attach.  Then the lookup cost of an attach with
1,000 controllers and 4,000 namespaces present.

    python benchmarks/sim_attach.py [--json out.json]
"""

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time

from nvmeof_mp.connector import NVMeOFConnector
from nvmeof_mp.plan import find_namespace
from nvmeof_mp.sim import SimHost, SimNamespace
from nvmeof_mp.connection import parse

NQN = "nqn.2014-08.org.nvmeof-mp:bench-%d"


def uuid(i, n=0):
    return "00000000-%04x-4000-8000-%012d" % (n, i)


def setup(volumes, portals, native=True):
    root = tempfile.mkdtemp(prefix="nvmeof-mp-bench-")
    sim = SimHost(root, native_multipath=native, ns_delay=0.0)
    for i in range(volumes):
        sim.add_target(NQN % i, [("127.0.0.1", 4420 + p) for p in range(portals)],
                       [SimNamespace(1, uuid(i))])
    def connector():
        return NVMeOFConnector(kernel=sim, root=root, clock=sim.clock, use_multipath=True,
                               lock_path=root + "/locks")
    infos = [{"vol_uuid": uuid(i), "target_nqn": NQN % i,
              "portals": [["127.0.0.1", 4420 + p, "tcp"] for p in range(portals)]}
             for i in range(volumes)]
    return sim, connector, infos


def run(volumes, portals, rounds=5):
    attach, detach, calls = [], [], []
    for _ in range(rounds):
        sim, connector, infos = setup(volumes, portals)
        conns = [connector() for _ in infos]
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(volumes) as pool:
            list(pool.map(lambda ci: ci[0].connect_volume(ci[1]), zip(conns, infos, strict=True)))
        attach.append(time.perf_counter() - t)
        # a native attach's portal connects are one privileged call ("connect_all"); a
        # single-path attach makes one per portal tried
        c = sim.calls
        direct = c["connect"] if not c["connect_all"] else 0
        calls.append((sum(v for k, v in c.items() if k != "connect") + direct) / volumes)
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(volumes) as pool:
            list(pool.map(lambda ci: ci[0].disconnect_volume(ci[1], None),
                          zip(conns, infos, strict=True)))
        detach.append(time.perf_counter() - t)
        assert sim.controllers() == []
    return {"volumes": volumes, "portals": portals,
            "attach_ms": statistics.median(attach) * 1000,
            "detach_ms": statistics.median(detach) * 1000,
            "privileged_calls_per_attach": statistics.median(calls)}


def lookup_scale(subsystems, namespaces_each):
    root = tempfile.mkdtemp(prefix="nvmeof-mp-scale-")
    sim = SimHost(root, ns_delay=0.0)
    for i in range(subsystems):
        sim.add_target(NQN % i, [("127.0.0.1", 4420)],
                       [SimNamespace(n + 1, uuid(i, n)) for n in range(namespaces_each)])
        sim.connect({"nqn": NQN % i, "traddr": "127.0.0.1", "trsvcid": "4420",
                     "transport": "tcp"})
    sim.clock.sleep(1)
    c = NVMeOFConnector(kernel=sim, root=root, clock=sim.clock)
    req = parse({"vol_uuid": uuid(subsystems - 1, namespaces_each - 1),
                 "target_nqn": NQN % (subsystems - 1), "portals": [["127.0.0.1", 4420, "tcp"]]})
    times = []
    for _ in range(20):
        t = time.perf_counter()
        ns = find_namespace(req.target, c.sysfs.snapshot([req.target.nqn]))
        times.append(time.perf_counter() - t)
    assert ns is not None
    return {"controllers": subsystems, "namespaces": subsystems * namespaces_each,
            "lookup_ms": statistics.median(times) * 1000}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [run(1, p) for p in (1, 2, 4)] + [run(v, 2, rounds=3) for v in (8, 16, 32, 64)]
    print("%8s %8s %12s %12s %14s" % ("volumes", "portals", "attach ms", "detach ms",
                                       "priv calls/att"))
    for r in rows:
        print("%8d %8d %12.1f %12.1f %14.1f" % (r["volumes"], r["portals"], r["attach_ms"],
                                                r["detach_ms"], r["privileged_calls_per_attach"]))
    scale = [lookup_scale(n, 4) for n in (250, 500, 1000)]  # grows at most linearly
    for s in scale:
        print("lookup with %d controllers / %d namespaces: %.2f ms" % (
            s["controllers"], s["namespaces"], s["lookup_ms"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"attach": rows, "lookup": scale}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

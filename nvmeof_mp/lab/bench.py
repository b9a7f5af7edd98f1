"""Attach performance, this library against os-brick, on the real kernel (lab VM, as root).

Not a test: it prints one table and writes JSON.  Both libraries run in long-lived worker
processes (``bench_worker``) with the same privsep set-up (a daemon started through a root
helper), against the same nvmet target; runs alternate A B A B and medians are reported.
The lower bound is the kernel alone: ``nvme connect`` processes in parallel, and option
strings written to /dev/nvme-fabrics, until every block device with its uuid exists.

    python -m nvmeof_mp.lab bench            (host: prepares os-brick's venv, boots the VM)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

NQN = "nqn.2014-08.org.nvmeof-mp:bench-%d"
SCENARIOS = ("cold", "single", "k8", "k32", "raid", "procs", "import")
PORTS = (4420, 4421, 4422, 4423)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_worker.py")


def uuid(i):
    return "00000000-0000-4000-8000-%012d" % (i + 1)


def info(i, portals):
    return {"vol_uuid": uuid(i), "target_nqn": NQN % i,
            "portals": [["127.0.0.1", str(p), "tcp"] for p in PORTS[:portals]]}


def raid_info(i):
    return {"alias": "bench%d" % i, "replica_count": 2, "vol_uuid": uuid(200 + i),
            "volume_replicas": [info(i, 1), dict(info(i + 100, 1), portals=[
                ["127.0.0.1", str(PORTS[1]), "tcp"]])]}


class Worker:
    def __init__(self, lib, python, root_helper):
        self.lib = lib
        self.proc = subprocess.Popen([python, WORKER, lib, root_helper], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd="/")

    def send(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("%s worker died" % self.lib)
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError("%s: %s" % (self.lib, reply["error"]))
        return reply

    def call(self, **cmd):
        self.send(**cmd)
        return self.recv()

    def close(self):
        with_timeout = self.proc.stdin
        try:
            with_timeout.write('{"op": "quit"}\n')
            with_timeout.flush()
        except OSError:
            pass
        self.proc.wait(60)


def devices_ready(uuids):
    want = set(uuids)
    seen = set()
    for name in os.listdir("/sys/class/block"):
        try:
            with open("/sys/class/block/%s/uuid" % name) as f:
                u = f.read().strip()
            with open("/sys/class/block/%s/hidden" % name) as f:
                hidden = f.read().strip() == "1"
        except OSError:
            continue
        if u in want and not hidden:
            seen.add(u)
    return seen == want


def wait_devices(uuids, timeout=60):
    end = time.monotonic() + timeout
    while not devices_ready(uuids):
        if time.monotonic() > end:
            raise RuntimeError("devices did not appear")
        time.sleep(0.005)


def hostnqn():
    with open("/etc/nvme/hostnqn") as f:
        return f.read().strip()


def quiesce():
    """Start every measurement from a quiet host: udev done with the last run's events (a
    detach of eight volumes leaves ~40 of them, which would slow whoever runs next)."""
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)


def floor_fabrics(infos):
    """Option strings written to /dev/nvme-fabrics (one thread: the kernel serializes)."""
    t = time.monotonic()
    host = hostnqn()
    for i in infos:
        for traddr, svc, tr in i["portals"]:
            fd = os.open("/dev/nvme-fabrics", os.O_RDWR)
            try:
                os.write(fd, ("nqn=%s,transport=%s,traddr=%s,trsvcid=%s,hostnqn=%s" % (
                    i["target_nqn"], tr, traddr, svc, host)).encode())
            finally:
                os.close(fd)
    wait_devices([i["vol_uuid"] for i in infos])
    return time.monotonic() - t


def floor_cli(infos):
    """``nvme connect`` processes, all in parallel."""
    t = time.monotonic()
    procs = [subprocess.Popen(["nvme", "connect", "-t", tr, "-a", traddr, "-s", svc, "-n",
                               i["target_nqn"]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for i in infos for traddr, svc, tr in i["portals"]]
    for p in procs:
        p.wait()
    wait_devices([i["vol_uuid"] for i in infos])
    return time.monotonic() - t


def floor_detach():
    """Delete every controller through sysfs (what a detach costs the kernel)."""
    t = time.monotonic()
    for name in os.listdir("/sys/class/nvme"):
        with open("/sys/class/nvme/%s/delete_controller" % name, "w") as f:
            f.write("1")
    while os.listdir("/sys/class/nvme"):
        time.sleep(0.005)
    return time.monotonic() - t


def setup_target(volumes):
    from nvmeof_mp.lab.target import Target
    target = Target()
    for pid, svc in enumerate(PORTS, 1):
        target.add_port(pid, svc)
    for i in list(range(volumes)) + [100 + i for i in range(2)]:
        target.add_subsystem(NQN % i)
        target.add_namespace(NQN % i, 1, 8, uuid(i), ana_group=1)
        for pid in range(1, len(PORTS) + 1):
            target.link(pid, NQN % i)
    return target


def scenario(workers, infos, threads, runs, results, name, floors=True):
    """Alternate libraries run by run; every run attaches all ``infos``, then detaches."""
    rows = {w.lib: {"attach": [], "detach": [], "calls": [], "forks": [], "per_volume": []}
            for w in workers}
    rows["floor_fabrics"] = {"attach": [], "detach": []}
    rows["floor_cli"] = {"attach": []}
    for run in range(runs):
        # each run starts with the next library: nobody always follows the same one
        for w in workers[run % len(workers):] + workers[:run % len(workers)]:
            quiesce()
            a = w.call(op="attach", infos=infos, threads=threads)
            quiesce()
            d = w.call(op="detach", infos=infos, devices=a["result"], threads=threads)
            rows[w.lib]["attach"].append(a["wall"])
            rows[w.lib]["detach"].append(d["wall"])
            rows[w.lib]["per_volume"].append(statistics.mean(a["each"]))
            rows[w.lib]["calls"].append(a["privsep_calls"] / len(infos))
            rows[w.lib]["forks"].append(a["forks"] / len(infos))
            if os.listdir("/sys/class/nvme"):
                raise RuntimeError("%s left controllers behind" % w.lib)
        if floors:
            quiesce()
            rows["floor_fabrics"]["attach"].append(floor_fabrics(infos))
            quiesce()
            rows["floor_fabrics"]["detach"].append(floor_detach())
            quiesce()
            rows["floor_cli"]["attach"].append(floor_cli(infos))
            floor_detach()
    med = {lib: {k: statistics.median(v) for k, v in r.items() if v} for lib, r in rows.items()}
    results[name] = {"runs": runs, "threads": threads, "volumes": len(infos), "median": med,
                     "all": rows}
    print("bench: %-28s %s" % (name, "  ".join(
        "%s=%.2fs" % (lib, m.get("attach", float("nan"))) for lib, m in med.items())),
        flush=True)


def processes_scenario(python_for, root_helper_for, infos, runs, results, name):
    """K separate processes per library, each warm, attaching one volume at the same time."""
    rows = {}
    for lib in python_for:
        workers = [Worker(lib, python_for[lib], root_helper_for[lib]) for _ in infos]
        for w in workers:
            w.send(op="init")
        for w in workers:
            w.recv()
        rows[lib] = {"attach": [], "detach": []}
        for _ in range(runs):
            quiesce()
            t = time.monotonic()
            for w, i in zip(workers, infos, strict=True):
                w.send(op="attach", infos=[i], threads=1)
            devices = [w.recv()["result"][0] for w in workers]
            rows[lib]["attach"].append(time.monotonic() - t)
            quiesce()
            t = time.monotonic()
            for w, i, d in zip(workers, infos, devices, strict=True):
                w.send(op="detach", infos=[i], devices=[d], threads=1)
            for w in workers:
                w.recv()
            rows[lib]["detach"].append(time.monotonic() - t)
        for w in workers:
            w.close()
    med = {lib: {k: statistics.median(v) for k, v in r.items()} for lib, r in rows.items()}
    results[name] = {"runs": runs, "volumes": len(infos), "median": med, "all": rows}
    print("bench: %-28s %s" % (name, "  ".join(
        "%s=%.2fs" % (lib, m["attach"]) for lib, m in med.items())), flush=True)


def cold_vs_warm(python_for, root_helper_for, results, processes=5):
    """Fresh processes: daemon start, first attach, then warm attaches (medians over
    ``processes``: one first attach is a single sample of a noisy kernel)."""
    out = {}
    for lib in python_for:
        starts, firsts, warms = [], [], []
        for _ in range(processes):
            w = Worker(lib, python_for[lib], root_helper_for[lib])
            starts.append(w.call(op="init")["wall"])
            times = []
            for _ in range(3):
                quiesce()
                a = w.call(op="attach", infos=[info(0, 2)], threads=1)
                w.call(op="detach", infos=[info(0, 2)], devices=a["result"], threads=1)
                times.append(a["wall"])
            w.close()
            firsts.append(times[0])
            warms += times[1:]
        out[lib] = {"daemon_start": statistics.median(starts),
                    "first_attach": statistics.median(firsts),
                    "warm_attach": statistics.median(warms),
                    "all_first": firsts, "all_warm": warms}
    results["cold_vs_warm"] = out
    print("bench: cold vs warm %s" % json.dumps(out), flush=True)


def import_costs(python_for, results):
    out = {}
    for lib, cmd in (("ours", [python_for["ours"], "-m", "nvmeof_mp.cli", "properties"]),
                     ("osbrick", [python_for["osbrick"], "-c",
                                  "import os_brick.initiator.connector"])):
        times = []
        for _ in range(3):
            t = time.monotonic()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True)
            times.append(time.monotonic() - t)
        out[lib] = statistics.median(times)
    results["cold_process"] = {"ours_properties": out["ours"],
                               "osbrick_import_connector": out["osbrick"]}
    print("bench: cold process %s" % json.dumps(results["cold_process"]), flush=True)


OP_LABELS = {"per_volume": "mean/vol"}      # mean time until each volume was attached


def table(results):
    """ours = default (root: no udev wait); 'udev' = wait_for_udev always; floor = kernel."""
    lines = ["%-40s %7s %8s %8s %7s %8s %8s %8s %8s" % (
        "scenario", "ours s", "w/ udev", "os-brick", "floor", "ours/osb", "ours/flr",
        "flr/osb", "priv/att")]
    for name, r in results.items():
        m = r.get("median") if isinstance(r, dict) else None
        if not m or "ours" not in m:
            continue
        ops = ("attach", "per_volume", "detach") if r.get("volumes", 1) > 1 else (
            "attach", "detach")
        for op in ops:
            ours = m["ours"].get(op)
            if ours is None:
                continue
            nu = m.get("ours-udev", {}).get(op)
            osb = m.get("osbrick", {}).get(op)
            floor = m.get("floor_fabrics", {}).get(op)
            calls = m["ours"].get("calls") if op == "attach" else None
            # flr/osb: the kernel alone against os-brick, the best any connector could do
            lines.append("%-40s %7.2f %8s %8s %7s %8s %8s %8s %8s" % (
                "%s %s" % (name, OP_LABELS.get(op, op)), ours, _f(nu), _f(osb), _f(floor),
                _f(osb and ours / osb), _f(floor and ours / floor),
                _f(osb and floor and floor / osb),
                "%.1f" % calls if calls is not None else "-"))
    cold = results.get("cold_vs_warm", {})
    for lib, c in cold.items():
        lines.append("%-8s cold: daemon start %.2fs, first attach %.2fs, warm %.2fs (%.2fx)" % (
            lib, c["daemon_start"], c["first_attach"], c["warm_attach"],
            c["first_attach"] / c["warm_attach"]))
    proc = results.get("cold_process")
    if proc:
        lines.append("cold process: nvmeof-mp properties %.2fs, import os-brick connector "
                     "%.2fs (%.2fx)" % (proc["ours_properties"], proc["osbrick_import_connector"],
                                        proc["ours_properties"] / proc["osbrick_import_connector"]))
    return "\n".join(lines)


def _f(value):
    return "%.2f" % value if value else "-"


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--osbrick-python", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(SCENARIOS))
    args = ap.parse_args(argv)
    python_for = {"ours": sys.executable, "osbrick": args.osbrick_python}
    root_helper_for = {lib: "env PATH=%s:/usr/sbin:/usr/bin:/sbin:/bin" % os.path.dirname(py)
                       for lib, py in python_for.items()}
    target = setup_target(32)
    results = {}
    want = set(args.only.split(",")) if args.only else set(SCENARIOS)
    try:
        # the kernel's and udev's own first-time costs must not be charged to a library
        floor_fabrics([info(0, 2)])
        floor_detach()
        if "cold" in want:
            cold_vs_warm(python_for, root_helper_for, results)
        workers = [Worker(lib, python_for[lib], root_helper_for[lib]) for lib in python_for]
        workers.append(Worker("ours-udev", python_for["ours"], root_helper_for["ours"]))
        for w in workers:
            w.call(op="init")
            a = w.call(op="attach", infos=[info(0, 1)], threads=1)     # past first-call costs
            w.call(op="detach", infos=[info(0, 1)], devices=a["result"], threads=1)
        if "single" in want:
            for portals in (1, 2, 4):
                scenario(workers, [info(0, portals)], 1, args.runs, results,
                         "1 volume, %d portal%s" % (portals, "s" if portals > 1 else ""))
        if "k8" in want:
            scenario(workers, [info(i, 2) for i in range(8)], 8, args.runs, results,
                     "8 volumes x 2 portals, threads")
        if "k32" in want:
            scenario(workers, [info(i, 2) for i in range(32)], 32, max(3, args.runs // 2),
                     results, "32 volumes x 2 portals, threads")
        if "raid" in want:
            scenario(workers, [raid_info(0)], 1, args.runs, results, "RAID1, 2 replicas",
                     floors=False)
        for w in workers:
            w.close()
        if "procs" in want:
            processes_scenario(python_for, root_helper_for, [info(i, 2) for i in range(8)],
                               3, results, "8 volumes x 2 portals, procs")
        if "import" in want:
            import_costs(python_for, results)
    finally:
        target.teardown()
    text = table(results)
    print(text, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

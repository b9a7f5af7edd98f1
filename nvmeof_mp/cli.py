"""``nvmeof-mp``: the operator's command line.

    nvmeof-mp properties                 connector properties (what Nova sends Cinder)
    nvmeof-mp connect CONNINFO.json      attach; prints the device
    nvmeof-mp disconnect CONNINFO.json   detach
    nvmeof-mp paths DEVICE|CONNINFO.json per-path state and a verdict
    nvmeof-mp heal CONNINFO.json         reconnect what an attached volume lost
    nvmeof-mp heal --all                 the same for every volume this host attached, and
                                         finish what crashed processes left (the timer)
    nvmeof-mp status                     every attachment of this host: state, paths, events
    nvmeof-mp lab ...                    the real-kernel lab (see doc/source/lab.rst)

Imports are lazy: ``properties`` from a cold process must stay cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _load(path):
    with (sys.stdin if path == "-" else open(path)) as f:
        return json.load(f)


def _connector(args):
    from nvmeof_mp.connector import NVMeOFConnector
    return NVMeOFConnector(root_helper=args.root_helper, use_multipath=not args.no_multipath,
                           connect_method=args.connect_method)


def _emit(args, data, text=None):
    if args.json or text is None:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_properties(args):
    # the light path: no connector, no oslo import unless a root action is really needed
    from nvmeof_mp.hostinfo import HostInfo, connector_properties
    from nvmeof_mp.kernel import LazyKernel
    info = HostInfo(args.root, kernel=LazyKernel(args.root_helper))
    _emit(args, connector_properties(info, multipath=not args.no_multipath))


def cmd_connect(args):
    result = _connector(args).connect_volume(_load(args.conninfo))
    _emit(args, result, result["path"])


def cmd_disconnect(args):
    _connector(args).disconnect_volume(_load(args.conninfo), None, force=args.force,
                                       ignore_errors=args.ignore_errors)
    _emit(args, {"disconnected": True}, "disconnected")


def cmd_paths(args):
    from nvmeof_mp import connection, status
    from nvmeof_mp.topology import SysfsReader
    reader = SysfsReader(os.path.join(args.root, "sys"))
    if args.target.startswith("/dev/") or not os.path.isfile(args.target):
        report = status.device_status(reader.snapshot(), args.target)
        if report is None:
            print("%s is not an NVMe namespace device" % args.target, file=sys.stderr)
            return 2
        reports = [report]
    else:
        request = connection.parse(_load(args.target))
        snap = reader.snapshot([t.nqn for t in request.targets])
        reports = [status.target_status(snap, t) for t in request.targets]
    if args.json:
        _emit(args, reports if len(reports) > 1 else reports[0])
    else:
        print("\n".join(status.format_text(r) for r in reports))
    return 0 if all(r["verdict"] == status.HEALTHY for r in reports) else 1


def _print_left_out(report):
    for leg in report.get("left_out") or ():
        print("still degraded: %s is kept out: %s" % (leg["nqn"], leg["error"]))


def cmd_heal(args):
    if args.all == bool(args.conninfo):
        print("heal: give CONNINFO.json or --all", file=sys.stderr)
        return 2
    if args.all:
        entries = _connector(args).heal_all()
        if args.json:
            _emit(args, entries)
        else:
            for e in entries:
                print("%s: %s%s" % (e["volume"], e["action"], " (%s)" % ",".join(
                    e["verdicts"]) if e["verdicts"] else ""))
                _print_left_out(e)
            if not entries:
                print("no attachment registered on this host")
        return 0 if all(e["verdicts"] and set(e["verdicts"]) == {"healthy"}
                        and not e.get("degraded") for e in entries) else 1
    result = _connector(args).check_paths(_load(args.conninfo))
    if args.json:
        _emit(args, result)
    else:
        from nvmeof_mp import status
        if result.get("recovered"):     # a crashed process's attach or detach, finished
            print("left unfinished by a process that died: %s" % result["recovered"])
        elif not result["attached"]:
            print("not attached: nothing to heal")
        print("\n".join(status.format_text(r) for r in result["after"]))
        _print_left_out(result)
    return 0 if all(r["verdict"] == "healthy" for r in result["after"]) and not result.get(
        "degraded") else 1


def cmd_status(args):
    from nvmeof_mp import status
    entries = _connector(args).attachments()
    if args.json:
        _emit(args, entries)
        return 0
    if not entries:
        print("no attachment registered on this host")
    for e in entries:
        print(status.format_attachment(e))
    return 0 if all(e["state"] == "attached" and not e["interrupted"] and all(
        t["verdict"] == status.HEALTHY for t in e["targets"]) for e in entries) else 1


def build_parser():
    p = argparse.ArgumentParser(prog="nvmeof-mp", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--root-helper", default=os.environ.get("NVMEOF_MP_ROOT_HELPER"),
                   help="command that starts the privsep daemon as root, e.g. "
                   "'sudo nvmeof-mp-rootwrap /etc/nvmeof_mp/rootwrap.conf' "
                   "(default: $NVMEOF_MP_ROOT_HELPER; none when already root)")
    p.add_argument("--no-multipath", action="store_true",
                   help="connect one portal only (use_multipath=False)")
    p.add_argument("--connect-method", choices=("nvme-cli", "fabrics"), default=None,
                   help="default: [nvmeof_mp] connect_method (fabrics)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)   # read a captured tree
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("properties").set_defaults(func=cmd_properties)
    c = sub.add_parser("connect")
    c.add_argument("conninfo")
    c.set_defaults(func=cmd_connect)
    d = sub.add_parser("disconnect")
    d.add_argument("conninfo")
    d.add_argument("--force", action="store_true")
    d.add_argument("--ignore-errors", action="store_true")
    d.set_defaults(func=cmd_disconnect)
    s = sub.add_parser("paths")
    s.add_argument("target", help="/dev/nvmeXnY or a connection-info JSON file")
    s.set_defaults(func=cmd_paths)
    h = sub.add_parser("heal", help="reconnect missing paths/replicas of an attached volume")
    h.add_argument("conninfo", nargs="?")
    h.add_argument("--all", action="store_true",
                   help="every volume of this host's attachment registry")
    h.set_defaults(func=cmd_heal)
    st = sub.add_parser("status", help="every attachment of this host (the registry)")
    st.set_defaults(func=cmd_status)
    lab = sub.add_parser("lab", help="real-kernel lab in a VM (prepare, demo, gate, shell)")
    lab.add_argument("lab_args", nargs=argparse.REMAINDER)
    lab.set_defaults(func=cmd_lab)
    return p


def cmd_lab(args):
    from nvmeof_mp.lab.__main__ import main as lab_main
    return lab_main(args.lab_args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import logging
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nvmeof_mp.exception import NVMeOFError
    try:
        return args.func(args) or 0
    except NVMeOFError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""oslo.config options of nvmeof_mp (group ``[nvmeof_mp]``), with defaults for multipath.

Nova and Cinder load their own config files; these options live in the same files.
``etc/nvmeof_mp.conf.sample`` lists them; ``policy_from_conf()`` turns them into a
``TimeoutPolicy``.
"""

from __future__ import annotations

from oslo_config import cfg

from nvmeof_mp.policy import TimeoutPolicy

GROUP = "nvmeof_mp"

OPTS = [
    cfg.IntOpt("ctrl_loss_tmo", default=-1, min=-1,
               help="Seconds the kernel keeps reconnecting a lost controller before deleting "
                    "it and its block devices (-1: forever, as os-brick does).  With -1 a "
                    "volume survives a target outage of any length; a finite value must be "
                    "longer than the longest planned outage (e.g. an array upgrade).  "
                    "Controllers an attach reuses are never given a shorter timeout."),
    cfg.IntOpt("reconnect_delay", default=2, min=1,
               help="Seconds between reconnect attempts of a lost controller; a returning "
                    "path is used again within about this time."),
    cfg.IntOpt("fast_io_fail_tmo", default=None, min=-1,
               help="fast_io_fail_tmo for single-path and native-multipath controllers "
                    "(unset: kernel default 'off', I/O queues while a path reconnects)."),
    cfg.IntOpt("leg_fast_io_fail_tmo", default=1, min=0,
               help="fast_io_fail_tmo for RAID1 and DeviceMapper replica legs: I/O on a lost "
                    "leg fails after this many seconds so md / dm fail over."),
    cfg.IntOpt("keep_alive_tmo", default=None, min=1,
               help="Keep-alive timeout in seconds (unset: kernel default)."),
    cfg.IntOpt("nr_io_queues", default=None, min=1,
               help="Number of I/O queues per controller (unset: kernel default)."),
    cfg.FloatOpt("device_timeout", default=30.0, min=0.1,
                 help="Seconds to wait for the volume's block device after connecting."),
    cfg.FloatOpt("ana_wait", default=1.0, min=0,
                 help="Seconds to wait for an ANA-optimized path before accepting a "
                      "non-optimized one."),
    cfg.StrOpt("wait_for_udev", default="auto", choices=(
        ("auto", "wait for udev unless this process can already open the device (root); "
                 "replica legs always wait"),
        ("always", "return a new device only after udev processed it"),
        ("never", "return as soon as the kernel shows the device")),
        help="When a new block device is handed out.  Until udev processed it the device is "
             "root-only and has no /dev/disk links; waiting costs udev's processing time "
             "(0.05-0.3 s under emulation).  'auto' waits only when it matters to the "
             "caller."),
    cfg.StrOpt("connect_method", default="fabrics", choices=("fabrics", "nvme-cli"),
               help="How controllers are created: 'fabrics' writes the option string to "
                    "/dev/nvme-fabrics from the privsep daemon (one write, no process; "
                    "nvme-cli is used when that device is missing); 'nvme-cli' always runs "
                    "'nvme connect'."),
    cfg.FloatOpt("flush_timeout", default=30.0, min=0.1, max=3600,
                 help="Seconds a detach waits for the volume's flush.  A flush into a device "
                      "no path can serve would queue forever (dm queue_if_no_path, "
                      "ctrl_loss_tmo -1); after this time the detach fails, or with force "
                      "goes on and deletes the controllers, which fails the queued I/O."),
]


def register(conf=None):
    conf = conf or cfg.CONF
    conf.register_opts(OPTS, group=GROUP)
    return conf


def list_opts():
    """For oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [(GROUP, OPTS)]


def policy_from_conf(conf=None) -> TimeoutPolicy:
    conf = register(conf)
    g = conf[GROUP]
    return TimeoutPolicy(ctrl_loss_tmo=g.ctrl_loss_tmo, reconnect_delay=g.reconnect_delay,
                         keep_alive_tmo=g.keep_alive_tmo, nr_io_queues=g.nr_io_queues,
                         fast_io_fail_tmo=g.fast_io_fail_tmo,
                         leg_fast_io_fail_tmo=g.leg_fast_io_fail_tmo,
                         device_timeout=g.device_timeout, ana_wait=g.ana_wait,
                         wait_for_udev=g.wait_for_udev, flush_timeout=g.flush_timeout)


def sample_text():
    """The text of etc/nvmeof_mp.conf.sample (a test keeps the file in sync)."""
    import textwrap
    lines = ["# Options of nvmeof_mp, in the [nvmeof_mp] group of the service's config file.",
             "# Every option with its default (commented out).", "", "[%s]" % GROUP, ""]
    for opt in OPTS:
        lines += ["# " + line for line in textwrap.wrap(opt.help, 76)]
        choices = getattr(opt.type, "choices", None)
        lines.append("# (%s)%s" % (opt.type.__class__.__name__.lower(),
                                   " choices: " + ", ".join(choices) if choices else ""))
        lines.append("#%s = %s" % (opt.name, "<None>" if opt.default is None else opt.default))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(sample_text(), end="")

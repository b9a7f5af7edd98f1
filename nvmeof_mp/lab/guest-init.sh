#!/bin/bash
# PID 1 of the lab VM, after the initramfs switch_root'ed into the overlaid host root.
# Reads its job from $nvmeof_lab_out/job.sh (written by vm.run_in_vm): loads the NVMe/dm/md
# modules, creates the non-root lab user, installs the rootwrap config + sudoers entry a real
# deployment would have, runs the job's command as root, stores its exit code in
# $nvmeof_lab_out/guest-rc and powers off.  Without a command it opens a root shell.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export TERM=${TERM:-linux} LANG=C.UTF-8
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "lab-guest: [$(up)s] $*"; }
OUT=$nvmeof_lab_out
unset nvmeof_lab_out nvmeof_lab_modules nvmeof_lab_init
# shellcheck disable=SC1091
. "$OUT/job.sh" || { say "no job file"; echo o > /proc/sysrq-trigger; }

hostname nvmeof-lab
echo "127.0.1.1 nvmeof-lab" >> /etc/hosts   # sudo wants to resolve its host name
ip link set lo up 2>/dev/null || busybox ip link set lo up
mount -t configfs configfs /sys/kernel/config 2>/dev/null \
  || { modprobe configfs && mount -t configfs configfs /sys/kernel/config; }
echo 1 > /proc/sys/kernel/sysrq
install -m 0644 "$OUT/etc/modprobe.conf" /etc/modprobe.d/nvmeof-lab.conf
for m in "${LAB_MODULES[@]}"; do modprobe "$m" || say "modprobe $m failed"; done
say "modules loaded; nvme_core.multipath=$(cat /sys/module/nvme_core/parameters/multipath 2>&1)"

# udev, as on a real host: block devices get group "disk" (0660) and /dev/disk/by-id links;
# without it devtmpfs leaves /dev/nvme* root-only.
if [ -x /lib/systemd/systemd-udevd ]; then
  /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1
  udevadm trigger --action=add >/dev/null 2>&1
  timeout 30 udevadm settle
  say "udevd running"
fi

# The non-root user the connector runs as; it must be able to read the checkout and venv,
# even when they live under a 0700 home such as /root (chmod only touches the tmpfs overlay).
id -u "$LAB_USER" >/dev/null 2>&1 || useradd -m -U -G disk -s /bin/bash "$LAB_USER" \
  || say "useradd $LAB_USER failed"
# vm.py listed (host side, fast) what lacks o+r / o+x; chmod on the overlay copies it up.
xargs -0r chmod o+rX < "$OUT/chmod.list"
chmod 1777 "$OUT"

# Rootwrap + sudo, as on a deployed host: sudo <venv>/bin/nvmeof-mp-rootwrap <conf> CMD...
install -d -m 0755 /etc/nvmeof_mp/rootwrap.d
install -m 0644 "$OUT/etc/rootwrap.conf" /etc/nvmeof_mp/rootwrap.conf
if compgen -G "$LAB_PROJECT/etc/rootwrap.d/*.filters" >/dev/null; then
  install -m 0644 "$LAB_PROJECT"/etc/rootwrap.d/*.filters /etc/nvmeof_mp/rootwrap.d/
else
  say "WARNING: no $LAB_PROJECT/etc/rootwrap.d/*.filters; rootwrap will refuse everything"
fi
[ -x "$LAB_ROOTWRAP" ] || say "WARNING: $LAB_ROOTWRAP missing (pip install -e the project)"
install -d -m 0750 /etc/sudoers.d
install -m 0440 "$OUT/etc/sudoers" /etc/sudoers.d/nvmeof-mp-lab
# /etc/nvme/hostnqn and hostid are whatever the host has (nvme-cli's postinst creates them).
[ -e /etc/nvme/hostnqn ] || say "note: no /etc/nvme/hostnqn (the connector must create it)"

cd "$LAB_PROJECT" || cd /
rc=
if [ ${#LAB_ARGV[@]} -gt 0 ]; then
  up > "$OUT/boot-seconds"
  say "running: ${LAB_ARGV[*]}"
  timeout -k 5 "$LAB_TIMEOUT" "${LAB_ARGV[@]}" </dev/null; rc=$?
  say "command exit code $rc"
  echo "$rc" > "$OUT/guest-rc"
else
  say "interactive root shell; exit to power off"
  setsid -w -c bash -i </dev/ttyS0 >/dev/ttyS0 2>&1
fi
sync
echo o > /proc/sysrq-trigger
sleep 30

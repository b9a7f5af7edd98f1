#!/bin/busybox sh
# /init of the lab initramfs (busybox).  Mounts the host root read-only over virtio-9p,
# puts a tmpfs overlay on top so the guest may write anywhere (lost at power-off), mounts
# the writable results share and the kernel's modules at their paths, then switch_roots
# into the lab's guest init.  Parameters come from the kernel command line as environment:
#   nvmeof_lab_out=DIR      writable 9p share (tag "out"), mounted at DIR in the guest
#   nvmeof_lab_modules=DIR  unpacked lib/modules/<kver> of the kernel package
#   nvmeof_lab_init=FILE    program to exec as PID 1 after switch_root
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /mods/order); do insmod "/mods/$m" || echo "lab-initramfs: insmod $m failed"; done
rescue() { echo "lab-initramfs: $*; rescue shell"; exec sh; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /lower \
  || rescue "9p root mount failed"
mount -t tmpfs -o size=75% tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
  || { echo "lab-initramfs: overlay failed, root stays read-only"; mount --bind /lower /newroot; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
if [ -n "$nvmeof_lab_out" ]; then
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 out "/newroot$nvmeof_lab_out" \
    || echo "lab-initramfs: out share mount failed"
fi
kmods=/newroot/usr/lib/modules/$(uname -r)
mkdir -p "$kmods" && mount --bind "/newroot$nvmeof_lab_modules" "$kmods" \
  || echo "lab-initramfs: no kernel modules at $nvmeof_lab_modules"
echo "lab-initramfs: root ready at $(cut -d' ' -f1 /newroot/proc/uptime)s"
[ -x "/newroot$nvmeof_lab_init" ] || rescue "no guest init $nvmeof_lab_init"
exec switch_root /newroot "$nvmeof_lab_init"

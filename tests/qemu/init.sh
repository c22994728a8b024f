#!/bin/busybox sh
# PID 1 of the qemu lane's guest (see tests/qemu/guest.py for the protocol).
# Loads the modules, mounts the host's root filesystem (9p, read-only) at /host with
# fresh proc/sys/dev/tmp on top, the scratch disk (/dev/vda, ext4) at /host/var/tmp and
# the exchange directory (9p tag "xchg", writable) at /host/tmp/xchg, runs
# /tmp/xchg/run.sh chrooted in /host (HOME=/tmp), writes its exit status to /tmp/xchg/rc, powers off.
# Host directories named by strata.keep=DIR,DIR on the kernel command line (a checkout or a
# venv under /tmp or /var/tmp, which the guest's own mounts would hide) are bound back on top.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/$m" || echo "strata-guest: insmod $m failed"; done < /modules/order
R=/host
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$O,ro,cache=loose" hostroot $R || { echo "strata-guest: no host root"; poweroff -f; }
KEEP=$(sed -n 's/.*strata\.keep=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
i=0
for p in $KEEP; do
    mkdir -p /keep/$i && mount --bind "$R$p" /keep/$i || echo "strata-guest: cannot keep $p"
    i=$((i+1))
done
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/run
[ -b /dev/vda ] && mount -t ext4 /dev/vda $R/var/tmp
i=0
for p in $KEEP; do
    mkdir -p "$R$p" && mount --move /keep/$i "$R$p" || echo "strata-guest: cannot re-expose $p"
    i=$((i+1))
done
mkdir -p $R/tmp/xchg
mount -t 9p -o "$O" xchg $R/tmp/xchg || { echo "strata-guest: no exchange dir"; poweroff -f; }
echo "strata-guest: ready $(cut -d' ' -f1 /proc/uptime)s"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TERM=dumb \
    PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \
    chroot $R /bin/sh /tmp/xchg/run.sh > $R/tmp/xchg/output.log 2>&1
echo $? > $R/tmp/xchg/rc
echo "strata-guest: done $(cut -d' ' -f1 /proc/uptime)s"
sync
umount $R/tmp/xchg
umount $R/var/tmp 2>/dev/null
poweroff -f

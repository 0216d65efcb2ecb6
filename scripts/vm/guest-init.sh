#!/bin/busybox sh
# PID 1 of the test guest. setup.sh puts this file at /init of the
# initramfs, next to a static busybox, the decompressed kernel modules and
# /etc/replblk-vm.conf (KVER, MODTREE).
#
# It loads the modules, mounts the host's root (9p, read-only) at /newroot
# with the guest's own proc/sys/dev and tmpfs on /tmp, /run, /mnt, /dev/shm,
# mounts the run's control share (command in, exit status out) and the
# results share, then runs the command chrooted into /newroot and powers off.
# run.sh reads the exit status from the control share.

/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /ctl /newroot
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
# shellcheck disable=SC1091  # written by setup.sh into the initramfs
. /etc/replblk-vm.conf

say() { echo "replblk-vm: $*"; }

halt_guest() {
    sync
    poweroff -f
    # poweroff -f does not return; if it ever does, stop here rather than
    # letting PID 1 exit (which panics, and panic=-1 ends qemu too).
    sleep 1000000
}

fail() {
    say "GUEST ERROR: $*"
    if mountpoint -q /ctl; then echo "$*" > /ctl/guest-error; fi
    halt_guest
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Modules, in dependency order as worked out by setup.sh from modules.dep.
while read -r mod; do
    insmod "/modules/$mod.ko" || fail "insmod $mod failed"
done < /modules/order

p9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$p9" ctl /ctl || fail "cannot mount the control share"
# cache=loose: reads of the host root are ~25x faster than with the default
# cache=none (57 vs 2.3 MB/s, exec twice as fast); the host's files are taken
# as unchanging while the guest runs. The kernel command line may override
# it (run.sh passes REPLBLK_VM_APPEND there): replblk_vm.rootopts=cache=none
rootopts=$(sed -n 's/.*replblk_vm\.rootopts=\([^ ]*\).*/\1/p' /proc/cmdline)
mount -t 9p -o "$p9,ro,${rootopts:-cache=loose}" hostroot /newroot || fail "cannot mount the host root"

r=/newroot
mount -t proc proc $r/proc || fail "mount proc"
mount -t sysfs sysfs $r/sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs $r/dev || fail "mount devtmpfs"
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $r/dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm || fail "mount /dev/shm"
mount -t tmpfs -o mode=1777 tmpfs $r/tmp || fail "mount /tmp"
mount -t tmpfs -o mode=755 tmpfs $r/run || fail "mount /run"
mount -t tmpfs -o mode=755 tmpfs $r/mnt || fail "mount /mnt"
mkdir -p $r/mnt/results $r/run/replblk-vm
mount -t 9p -o "$p9" results $r/mnt/results || fail "cannot mount the results share"
mount --bind /ctl $r/run/replblk-vm || fail "bind the control share"
# Let the host's modprobe find this kernel's modules (the unpacked package
# in setup.sh's cache, seen through the host root).
if [ -d "$r/lib/modules" ] && [ -d "$r$MODTREE/$KVER" ]; then
    mount --bind "$r$MODTREE" "$r/lib/modules" || say "warning: cannot bind the module tree"
fi

hostname replblk-vm
ip link set lo up || fail "cannot bring up lo"

# Backstop should run.sh die without killing qemu: power off by ourselves
# a little after run.sh's own timeout.
deadline=$(sed -n 's/.*replblk_vm\.deadline=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$deadline" ]; then
    (sleep "$deadline"; say "guest watchdog: ${deadline}s since boot, powering off"; halt_guest) &
fi

echo started > /ctl/started
say ">>> command start"
chroot $r /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8 \
    REPLBLK_VM=1 REPLBLK_VM_RESULTS=/mnt/results \
    /bin/bash /run/replblk-vm/cmd.sh < /dev/null
rc=$?
# The status file is what run.sh trusts; the console line is a fallback.
echo "$rc" > /ctl/status.tmp && mv /ctl/status.tmp /ctl/status
say "<<< command exit $rc"
halt_guest

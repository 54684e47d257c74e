#!/bin/sh
# den-init: /init of the initramfs den builds for its microVMs (den.backends.microvm.assets).
#
# It runs as PID 1 on the initramfs's own busybox and never runs anything the
# workspace's root filesystem holds: it mounts that filesystem (virtiofs tag
# "root"), sets the network, hostname and resolver from den's kernel command line,
# and hands PID 1 to den's agent, copied from the initramfs into a tmpfs.
# Every failure prints "den-init: failed: <why>" on the console and powers the
# guest off, so that QEMU exits and the host sees the workspace failed.

export PATH=/bin
umask 022
NEW=/newroot

say() { echo "den-init: $*" >/dev/console; }

# halt: after a failure line (den-agent --setup prints its own).
halt() {
    sync
    poweroff -f
    sleep 5  # poweroff returned: init exits and the kernel panics (panic=-1: QEMU exits)
    exit 1
}

fail() {
    say "failed: $*"
    halt
}

# mount_at TYPE SOURCE DIR [OPTIONS]: DIR must be a real directory, never a symlink: a
# link in the workspace's tree would point the mount at the initramfs itself.
mount_at() {
    [ -L "$3" ] && fail "$3 is a symbolic link"
    [ -d "$3" ] || mkdir -p "$3" || fail "cannot make $3"
    mount -t "$1" ${4:+-o "$4"} "$2" "$3" || fail "cannot mount $1 $2 at $3"
}

# /dev first: /dev/console may not exist in the archive.
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
exec </dev/console >/dev/console 2>&1
mount_at proc proc /proc
mount_at sysfs sysfs /sys
mount_at tmpfs tmpfs /run mode=0755

# The command line: den writes every value; nothing is evaluated. (Shell builtins
# where they do: every fork and exec is emulated work under TCG.)
set -f
ip_addr= gw= dns= host=den mac= code=0 probe=0
read -r cmdline </proc/cmdline
for w in $cmdline; do
    case "$w" in
    den.ip=*) ip_addr=${w#*=} ;;
    den.gw=*) gw=${w#*=} ;;
    den.dns=*) dns=${w#*=} ;;
    den.hostname=*) host=${w#*=} ;;
    den.mac=*) mac=${w#*=} ;;
    den.code=*) code=${w#*=} ;;
    den.probe=*) probe=${w#*=} ;;
    esac
done
set +f

# The rest is den's agent's, in one process (den-agent.c, setup_main): under TCG every
# fork and exec of a busybox applet is emulated work (about 25 ms each, some twenty of
# them). It loads the modules in the order the build wrote (/lib/modules/load); sets
# lo, the address on the NIC with den's MAC (else the first that is not lo) and the
# route; mounts the root file system (virtiofs tag root) at $NEW and /code; writes
# the hostname, resolver and hosts into a tmpfs of den's at $NEW/run/den, bound over
# /etc's own when they are plain files (the snapshot itself is never written); copies
# itself there; links /dev/virtio-ports/<name>; mounts the kernel's file systems in
# the new root. Mount points must be real directories, never symbolic links (a link
# in the workspace's tree would point a mount at the initramfs itself). It prints
# its own failure line.
if [ "$probe" = 1 ]; then
    /den-agent --setup --modules /lib/modules || halt
    say "probe ok"
    sync
    poweroff -f
    sleep 5
    exit 0
fi
/den-agent --setup --modules /lib/modules --ip "$ip_addr" --gw "$gw" --mac "$mac" \
    --root "$NEW" --code "$code" --hostname "$host" --dns "$dns" \
    --agent /den-agent --port den.agent || halt

umount /proc /sys /run 2>/dev/null
say "ready"
exec switch_root "$NEW" /run/den/den-agent --port den.agent
fail "switch_root failed"

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

fail() {
    say "failed: $*"
    sync
    poweroff -f
    sleep 5  # poweroff returned: init exits and the kernel panics (panic=-1: QEMU exits)
    exit 1
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

# Modules, in dependency order (the build wrote the list).
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" || fail "cannot load module $m"
done </lib/modules/load

if [ "$probe" = 1 ]; then
    say "probe ok"
    sync
    poweroff -f
    sleep 5
    exit 0
fi

# The root filesystem and /code.
mkdir -p "$NEW"
mount -t virtiofs root "$NEW" || fail "cannot mount the root filesystem (virtiofs tag root)"
[ "$code" = 1 ] && mount_at virtiofs code "$NEW/code"

# The network: the interface with den's MAC (else the first that is not lo).
ip link set lo up || fail "cannot bring lo up"
if [ -n "$ip_addr" ]; then
    dev=
    for i in 1 2 3 4 5 6 7 8 9 10; do
        for d in /sys/class/net/*; do
            n=${d##*/}
            [ "$n" = lo ] && continue
            read -r addr <"$d/address"
            if [ -z "$mac" ] || [ "$addr" = "$mac" ]; then
                dev=$n
                break
            fi
        done
        [ -n "$dev" ] && break
        sleep 0.1
    done
    [ -n "$dev" ] || fail "no network interface ${mac:+with MAC $mac}"
    ip addr add "$ip_addr" dev "$dev" || fail "cannot set address $ip_addr on $dev"
    ip link set "$dev" up || fail "cannot bring $dev up"
    if [ -n "$gw" ]; then
        ip route add default via "$gw" dev "$dev" || fail "cannot add the route via $gw"
    fi
fi

# Hostname, resolver, hosts: files in a tmpfs of den's, bound over the rootfs's own
# (when it has them as plain files), so that the snapshot itself is never written.
echo "$host" >/proc/sys/kernel/hostname || fail "cannot set the hostname $host"
mount_at tmpfs den-run "$NEW/run"
mount_at tmpfs den "$NEW/run/den" mode=0755
echo "$host" >"$NEW/run/den/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n' \
    "$host" >"$NEW/run/den/hosts"
: >"$NEW/run/den/resolv.conf"
set -f
IFS=,
for s in $dns; do
    echo "nameserver $s" >>"$NEW/run/den/resolv.conf"
done
unset IFS
set +f
for f in hostname hosts resolv.conf; do
    t="$NEW/etc/$f"
    if [ -f "$t" ] && [ ! -L "$t" ]; then
        mount -o bind "$NEW/run/den/$f" "$t" || fail "cannot bind /etc/$f"
    fi
done
cp /den-agent "$NEW/run/den/den-agent" || fail "cannot copy the agent"  # mode 0755 kept

# The agent's port by name (/dev/virtio-ports/den.agent): no udev here makes the link.
port=
if [ -d /sys/class/virtio-ports ]; then
    mkdir -p /dev/virtio-ports
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        for p in /sys/class/virtio-ports/*; do
            [ -f "$p/name" ] || continue
            n=
            read -r n <"$p/name"
            [ -n "$n" ] || continue
            ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
            [ "$n" = den.agent ] && port=$n
        done
        [ -n "$port" ] && break
        sleep 0.1
    done
fi
[ -n "$port" ] || fail "no virtio-serial port den.agent"

# The kernel's file systems in the new root. devtmpfs is one file system: the links
# made above are there too.
mount_at proc proc "$NEW/proc"
mount_at sysfs sysfs "$NEW/sys"
mount_at devtmpfs devtmpfs "$NEW/dev"
mount_at devpts devpts "$NEW/dev/pts" gid=5,mode=0620,ptmxmode=0666
mount_at tmpfs shm "$NEW/dev/shm" mode=1777
[ -e "$NEW/dev/ptmx" ] || ln -s pts/ptmx "$NEW/dev/ptmx"

umount /proc /sys /run 2>/dev/null
say "ready"
exec switch_root "$NEW" /run/den/den-agent --port den.agent
fail "switch_root failed"

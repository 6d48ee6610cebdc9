#!/bin/sh
# /sbin/bootlink-nbd in a dracut initrd (an initqueue job): attach the root disk over NBD
# from the laptop that bootlink's client found.
#
# Kernel command line (set by bootlink's client):
#   bootlink.nbd_host=fe80::...   the server's IPv6 link-local (or any) address
#   bootlink.nbd_port=10809       bootlink.nbd_export=bootlink
#   bootlink.if_mac=aa:bb:...     which NIC: the one the client used
#   bootlink.nbd_ro=1             attach read-only
#   bootlink.nbd_dev=/dev/nbd0    (optional) which NBD device
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

host=$(getarg bootlink.nbd_host=)
[ -n "$host" ] || exit 0
port=$(getarg bootlink.nbd_port=)
port=${port:-10809}
export_name=$(getarg bootlink.nbd_export=)
export_name=${export_name:-bootlink}
mac=$(getarg bootlink.if_mac= | tr 'A-F' 'a-f')
dev=$(getarg bootlink.nbd_dev=)
dev=${dev:-/dev/nbd0}
ro=""
[ "$(getarg bootlink.nbd_ro=)" = 1 ] && ro=-readonly

fail() {
    warn "bootlink: NBD root failed: $*"
    exit 1
}

info "bootlink: NBD root [$host]:$port export '$export_name' via NIC ${mac:-any}"
modprobe nbd || fail "no nbd module in the initrd: re-run 'bootlink setup-server-os'"

# The NIC: its driver may still be loading (USB adapters take a few seconds).
ifname=""
tries=0
while [ -z "$ifname" ]; do
    for d in /sys/class/net/*; do
        [ -e "$d/address" ] || continue
        [ "${d##*/}" = lo ] && continue
        if [ -z "$mac" ] || [ "$(cat "$d/address")" = "$mac" ]; then
            ifname=${d##*/}
            break
        fi
    done
    [ -n "$ifname" ] && break
    tries=$((tries + 1))
    [ "$tries" -gt 300 ] && fail "no NIC with MAC $mac after 30 s (driver missing from the initrd?)"
    sleep 0.1
done

# IPv6 link-local, no duplicate address detection: a cable between two machines has
# nobody to collide with, and DAD would delay the first packet by a second or more.
echo 0 >"/proc/sys/net/ipv6/conf/$ifname/disable_ipv6" 2>/dev/null
echo 0 >"/proc/sys/net/ipv6/conf/$ifname/accept_dad" 2>/dev/null
echo 0 >"/proc/sys/net/ipv6/conf/$ifname/dad_transmits" 2>/dev/null
ip link set dev "$ifname" up || fail "cannot bring $ifname up"
tries=0
until ip -6 addr show dev "$ifname" scope link 2>/dev/null | grep -q "inet6 fe80"; do
    tries=$((tries + 1))
    [ "$tries" -gt 200 ] && fail "$ifname got no IPv6 link-local address in 20 s (cable?)"
    sleep 0.1
done

case "$host" in
fe80:* | FE80:*) target="$host%$ifname" ;;
*) target="$host" ;;
esac
# Netlink mode: the kernel itself holds the connection and no process has to survive.
# The ioctl mode (-nonetlink) keeps nbd-client blocked in NBD_DO_IT, which ANY signal
# interrupts, and the kernel then shuts the socket: systemd's switch-root and final
# shutdown send SIGSTOP/SIGCONT to every process (kill(-1, ...)), '@'-marked ones
# included, so root I/O fails right at the switch (seen in QEMU). No -timeout: on a cut
# cable I/O waits and the same TCP connection resumes when it is back (both link-local
# addresses stay). -persist/-systemd-mark matter only to nbd-client versions that keep a
# monitoring process in netlink mode.
tries=0
# shellcheck disable=SC2086
until nbd-client "$target" "$port" "$dev" -N "$export_name" -persist -systemd-mark $ro; do
    tries=$((tries + 1))
    [ "$tries" -ge 15 ] && fail "nbd-client could not attach [$target]:$port ($export_name)"
    sleep 1
done

base=${dev##*/}
tries=0
until [ "$(cat "/sys/block/$base/size" 2>/dev/null || echo 0)" -gt 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 100 ] && fail "$dev has size 0 after attaching"
    sleep 0.1
done
blockdev --rereadpt "$dev" 2>/dev/null || true
info "bootlink: NBD root attached: $dev"
exit 0

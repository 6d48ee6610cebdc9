#!/bin/bash
# dracut module "bootlink" (installed as /usr/lib/dracut/modules.d/90bootlink/ and enabled
# by /etc/dracut.conf.d/90-bootlink.conf): lets this initrd mount its root over NBD from
# the laptop that bootlink's client found, over IPv6 link-local (dracut's own nbd module
# needs DHCP/IPv4 addressing via its network stack); or from the root squashfs a
# published image brought along (bootlink.rootfs=, systemd initrds). Inert without
# either on the command line.

check() {
    require_binaries nbd-client ip || return 1
    return 0
}

depends() {
    echo base
    return 0
}

installkernel() {
    # The initrd boots on the *desktop*, whose NIC this machine may not have: take every
    # wired and USB Ethernet driver (and USB host drivers) whatever hostonly says.
    hostonly='' instmods nbd virtio_net virtio_pci
    # a published image's root squashfs (bootlink.rootfs=): loop device, squashfs, overlay
    hostonly='' instmods loop squashfs overlay
    hostonly='' instmods =drivers/net/ethernet =drivers/net/usb =drivers/usb/host
}

install() {
    inst_multiple nbd-client ip blockdev grep tr cat sleep
    inst_hook cmdline 90 "$moddir/bootlink-cmdline.sh"
    inst_multiple mount umount mkdir
    inst_script "$moddir/bootlink-rootfs-generator.sh" \
        "$systemdutildir/system-generators/dracut-bootlink-generator"
    inst_hook pre-pivot 10 "$moddir/bootlink-rootfs-overlay.sh"
    inst_script "$moddir/bootlink-nbd.sh" /sbin/bootlink-nbd
    # systemd initrds start the initqueue only when a module asks for it
    : > "${initdir}/lib/dracut/need-initqueue"
}

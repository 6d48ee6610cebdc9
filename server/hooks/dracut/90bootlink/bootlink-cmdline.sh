#!/bin/sh
# dracut cmdline hook (sourced): when bootlink's client booted us, queue the NBD attach.
# root= (root=UUID=... from the laptop's own command line) still names the filesystem;
# dracut waits for it to appear, which it does once /sbin/bootlink-nbd has attached.

if [ -n "$(getarg bootlink.nbd_host=)" ]; then
    info "bootlink: NBD root requested; attaching once udev has settled"
    /sbin/initqueue --settled --onetime --unique --name bootlink-nbd /sbin/bootlink-nbd
fi

# A root squashfs is mounted by dracut-bootlink-generator, a systemd generator: without
# systemd in the initrd nothing would mount it, so say so instead of hanging.
if [ -n "$(getarg bootlink.rootfs=)" ] && [ ! -d /run/systemd/system ]; then
    die "bootlink: a root squashfs needs a systemd initrd: add dracut's systemd module"
fi

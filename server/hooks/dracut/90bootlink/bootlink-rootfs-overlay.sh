#!/bin/sh
# dracut pre-pivot hook (sourced): with bootlink.rootfs=, /sysroot is a read-only
# squashfs; lay a tmpfs over it (overlayfs) so the booted system can write, as a live
# system does. Changes live in RAM and are gone at power-off. Both layers stay mounted
# under /run/bootlink, which moves into the new root with /run.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

if [ -n "$(getarg bootlink.rootfs=)" ]; then
    ro=/run/bootlink/ro
    rw=/run/bootlink/rw
    modprobe overlay
    mkdir -p "$ro" "$rw"
    # bind, then unmount: a move of /sysroot is refused when its parent is shared
    mount --bind "$NEWROOT" "$ro" && umount "$NEWROOT" \
        || die "bootlink: cannot move the squashfs root aside"
    mount -t tmpfs -o mode=0755 bootlink-rw "$rw" || die "bootlink: cannot mount a tmpfs"
    mkdir -p "$rw/upper" "$rw/work"
    mount -t overlay -o "lowerdir=$ro,upperdir=$rw/upper,workdir=$rw/work" bootlink-root \
        "$NEWROOT" || die "bootlink: overlayfs failed (overlay module missing from the initrd?)"
    info "bootlink: root = squashfs + tmpfs overlay"
fi

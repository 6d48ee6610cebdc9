#!/bin/sh
# systemd generator in a dracut initrd (installed as dracut-bootlink-generator): with
# bootlink.rootfs=PATH (a published image's root squashfs, which bootlink's client
# appended to this initrd), /sysroot is that squashfs through a read-only loop device.
# bootlink-rootfs-overlay.sh (pre-pivot) then lays a tmpfs over it. Generators run
# before any service, so this is where the root mount has to be declared.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

rootfs=$(getarg bootlink.rootfs=)
[ -n "$rootfs" ] || exit 0
dir="$1"
mkdir -p "$dir/initrd-root-fs.target.requires"
cat >"$dir/sysroot.mount" <<UNIT
# bootlink: the root squashfs that came with the boot image
[Unit]
Before=initrd-root-fs.target
[Mount]
Where=/sysroot
What=$rootfs
Type=squashfs
Options=loop,ro
UNIT
ln -sf ../sysroot.mount "$dir/initrd-root-fs.target.requires/sysroot.mount"
exit 0

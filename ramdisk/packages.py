"""What goes into the ramdisk: Debian packages, kernel modules, and what is pruned again.

Pure data and pure functions, so the build recipe can be unit-tested and hashed into
cache keys without running anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from bootlink.common.errors import BootlinkError

SUITE = "bookworm"

# Runtime of both roles. The essential variant adds only Essential:yes packages
# (coreutils, dash, util-linux...) on top of these.
RUNTIME_PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-cryptography",
    "python3-yaml",
    "python3-pyroute2",
    "python3-psutil",
    "python3-libnbd",  # the client's check that the export is reachable and sane
    "python3-pycryptodome",
    # `iso:` and web distro-ISO sources read the ISO with pycdlib (imported only when one
    # is used). Debian makes it depend on genisoimage (for its tests): those programs,
    # libmagic and its 8 MB database are pruned again (PRUNE_PATHS, elfdeps).
    "python3-pycdlib",
    "nbd-client",
    "nbdkit",  # the server role exports the laptop's disk with nbdkit's file plugin
    "iproute2",
    "busybox",  # rescue shell and small tools (cttyhack, poweroff -f)
    "kmod",  # real modprobe: busybox's ignores softdeps (ext4 needs crc32c)
    "ca-certificates",  # https:// sources verify the server (Python's default CA store)
)
# The client prefers the pure-Python kexec_file_load; kexec-tools is the fallback for
# kernels the file syscall refuses. It pulls the Xen libraries, so it is optional.
OPTIONAL_PACKAGES: tuple[str, ...] = ("kexec-tools",)

# Documentation and translations nobody reads on a ramdisk.
DPKG_EXCLUDES: tuple[str, ...] = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    "/usr/share/linda/*",
    "/usr/share/bash-completion/*",
    "/usr/share/zsh/*",
    "/usr/share/bug/*",
    "/usr/share/common-licenses/*",
)

# Removed from the finished tree: needed to install packages, never at run time.
PRUNE_PATHS: tuple[str, ...] = (
    "var/lib/dpkg",  # the manifest keeps the package list
    "var/lib/apt",
    "var/cache",
    "var/log",
    "usr/share/perl5",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/bin/perl",
    "usr/bin/perl5.36.0",
    "usr/share/debconf",
    "usr/lib/python3.11/pydoc_data",  # 0.7 MB of help text
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/share/zoneinfo",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/python3.11/dbm",
    "usr/lib/python3.11/curses",
    "usr/lib/python3.11/turtle.py",  # iconv charsets: UTF-8 and ASCII are built in
    "usr/lib/python3.11/test",  # regrtest and its support package
    "usr/lib/python3.11/pydoc.pyc",  # help()
    "usr/lib/python3.11/doctest.pyc",
    "usr/lib/python3.11/xmlrpc",
    "usr/lib/python3.11/wsgiref",
    "usr/lib/python3.11/_pydecimal.pyc",  # decimal's fallback when _decimal is missing
    "usr/lib/python3/dist-packages/psutil/tests",
    "usr/libexec/coreutils",  # stdbuf's preload library (stdbuf goes with coreutils)
    "usr/lib/python3/dist-packages/Cryptodome/SelfTest",
    "usr/share/perl",
    "usr/lib/x86_64-linux-gnu/perl",
    "usr/share/pam",
    "usr/share/pam-configs",
    "usr/share/menu",
    "usr/share/lintian",
    "usr/share/python3/debian_defaults",
    "etc/apt",
    # programs nobody runs here whose libraries are big: Berkeley DB (arpd), Kerberos and
    # RPC (ss), systemd and libgcrypt (lslogins, logger), SASL and PAM's userdb plugins
    "usr/sbin/arpd",
    "usr/bin/ss",
    "usr/bin/lslogins",
    "usr/bin/logger",
    "usr/lib/x86_64-linux-gnu/sasl2",
    "usr/lib/x86_64-linux-gnu/krb5",
    "usr/lib/x86_64-linux-gnu/security/pam_userdb.so",
    "usr/bin/localedef",
    "usr/bin/dpkg",
    "usr/bin/dpkg-deb",
    "usr/bin/dpkg-query",
    "usr/bin/dpkg-divert",
    "usr/bin/dpkg-split",
    "usr/bin/dpkg-trigger",
    "usr/bin/dpkg-statoverride",
    "usr/bin/dpkg-realpath",
    "usr/bin/update-alternatives",
    # libmagic's database (8 MB), which only genisoimage (pulled in by python3-pycdlib,
    # removed with the other programs) reads
    "usr/lib/file",
    "usr/share/file",
    "usr/share/misc/magic",
    "usr/share/misc/magic.mgc",
    "etc/magic",
    "etc/magic.mime",
)

# Extension modules of the standard library nothing here imports; removing them lets the
# library pruning drop Berkeley DB, ncurses and readline too. (sqlite3 stays: `import
# pyroute2` loads its entry points, and one of them imports NDB, which imports sqlite3.)
LIB_DYNLOAD_DROP: tuple[str, ...] = (
    "_dbm", "_gdbm", "_curses", "_curses_panel", "readline", "nis", "audioop",
    "xxlimited", "xxlimited_35", "_xxtestfuzz", "_testcapi", "_testbuffer",
    "_testinternalcapi", "_testmultiphase", "_testimportmultiple", "_testclinic",
    "_ctypes_test", "_crypt", "ossaudiodev", "spwd", "_tkinter", "_lsprof",
    # CJK legacy codecs (Shift-JIS, Big5, GB2312...): nothing here reads such text
    "_codecs_jp", "_codecs_hk", "_codecs_cn", "_codecs_kr", "_codecs_tw", "_codecs_iso2022",
    "_multibytecodec",
)  # fmt: skip

# Programs something here runs: /init (dash, busybox, kmod's modprobe, ip, python3),
# bootlink (nbdkit, nbd-client, kexec from the optional kexec-tools, ldconfig: ctypes'
# find_library asks it when pyroute2 enters a namespace), the rescue shell (busybox).
# Every other program the Essential packages bring (coreutils, util-linux, bash, tar,
# grep, findutils, diffutils...: 19 MB, and the libraries only they link) is removed,
# and busybox applets stand in for them in the rescue shell. Less to unpack at each
# boot: the kernel spends ~15 ms per MB of ramdisk under emulation.
PROGRAM_DIRS: tuple[str, ...] = ("usr/bin", "usr/sbin")
KEEP_PROGRAMS: tuple[str, ...] = (
    "busybox", "dash", "sh", "python3", "python3.11", "kmod", "modprobe", "insmod",
    "rmmod", "lsmod", "depmod", "modinfo", "ip", "nbd-client", "nbdkit", "kexec", "ldconfig",
)  # fmt: skip
# Applets not linked into PATH: this ramdisk's init is /init.
BUSYBOX_SKIP: tuple[str, ...] = ("init", "linuxrc")

# nbdkit plugins and filters the server keeps (server/nbd_export.py runs
# `nbdkit --filter=ip file ...`); the others pull curl, ssh, torrent and boost.
NBDKIT_KEEP: tuple[str, ...] = (
    "nbdkit-file-plugin.so",
    "nbdkit-ip-filter.so",
    "nbdkit-null-plugin.so",
    "nbdkit-memory-plugin.so",
    "nbdkit-readahead-filter.so",
    "nbdkit-cache-filter.so",
    "nbdkit-retry-filter.so",
    "nbdkit-log-filter.so",
)

# Kernel modules, as globs relative to /lib/modules/<version>/kernel. Their
# dependencies (modules.dep) and soft pre-dependencies are added automatically.
MODULE_GLOBS: tuple[str, ...] = (
    # virtual machines
    "drivers/virtio/*",
    "drivers/net/virtio_net.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/scsi/virtio_scsi.ko",
    "drivers/char/hw_random/virtio-rng.ko",
    # PCIe Ethernet: Realtek r8169, Intel e1000/e1000e/igb/igc/ixgbe, Broadcom tg3/bnx2,
    # Aquantia atlantic, Atheros alx/atl1c, Marvell sky2, nVidia forcedeth, VIA...
    "drivers/net/ethernet/realtek/*",
    "drivers/net/ethernet/intel/e1000/*",
    "drivers/net/ethernet/intel/e1000e/*",
    "drivers/net/ethernet/intel/igb/*",
    "drivers/net/ethernet/intel/igc/*",
    "drivers/net/ethernet/intel/ixgbe/*",
    "drivers/net/ethernet/broadcom/tg3.ko",
    "drivers/net/ethernet/broadcom/bnx2.ko",
    "drivers/net/ethernet/broadcom/b44.ko",
    "drivers/net/ethernet/aquantia/atlantic/*",
    "drivers/net/ethernet/atheros/*/*",
    "drivers/net/ethernet/marvell/sky2.ko",
    "drivers/net/ethernet/nvidia/*",
    "drivers/net/ethernet/via/*",
    # USB Ethernet: r8152, ax88179_178a, asix, cdc_ether/ncm, smsc, lan78xx...
    "drivers/net/usb/*",
    "drivers/net/mii.ko",
    # USB, HID (keyboard for the rescue shell), Thunderbolt
    "drivers/usb/host/*",
    "drivers/usb/storage/*",
    "drivers/usb/typec/*",
    "drivers/thunderbolt/*",
    "drivers/hid/hid-generic.ko",
    "drivers/hid/usbhid/*",
    # the laptop's disk (server role) and the desktop's (client role, not used)
    "drivers/block/nbd.ko",
    "drivers/nvme/host/nvme.ko",
    "drivers/ata/ahci.ko",
    "drivers/scsi/sd_mod.ko",
    "drivers/mmc/host/sdhci-pci.ko",
    "drivers/mmc/core/mmc_block.ko",
    # filesystems (the server's boot files normally come embedded, see `config_layer`)
    "fs/ext4/*",
    "fs/fat/*",
    "fs/nls/nls_cp437.ko",
    "fs/nls/nls_ascii.ko",
    "fs/nls/nls_utf8.ko",
    "fs/nls/nls_iso8859-1.ko",
    "crypto/crc32c_generic.ko",
    "arch/x86/crypto/crc32c-intel.ko",
    # legacy persistent memory: `memmap=SIZE!START` (client.iso_memory) turns RAM into
    # /dev/pmem0, where a distro ISO waits for the next kernel (common/kexec.py). The
    # e820_pmem platform device is built in; nd_e820 binds it (modalias), nd_pmem the
    # namespace it creates (nd_btt and libnvdimm come as its dependencies).
    "drivers/nvdimm/libnvdimm.ko",
    "drivers/nvdimm/nd_e820.ko",
    "drivers/nvdimm/nd_pmem.ko",
    "drivers/nvdimm/nd_btt.ko",
    # battery and lid (server role treats the laptop kindly)
    "drivers/acpi/battery.ko",
    "drivers/acpi/ac.ko",
    "drivers/acpi/button.ko",
)


def package_list(with_kexec_tools: bool = False, extra: Iterable[str] = ()) -> list[str]:
    pkgs = list(RUNTIME_PACKAGES)
    if with_kexec_tools:
        pkgs += OPTIONAL_PACKAGES
    pkgs += [p for p in extra if p not in pkgs]
    return sorted(pkgs)


_PIN_LINE = re.compile(r"^([a-z0-9][a-z0-9+.-]*)(?::[a-z0-9]+)?\s*[= \t]\s*(\S+)$")


def parse_pins(text: str, source: str = "<pins>") -> dict[str, str]:
    """Pinned versions, from a manifest.json (its "packages") or `name=version` lines."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BootlinkError(
                f"{source}: not valid JSON ({exc.msg}): pass a manifest.json"
            ) from None
        pkgs = data.get("packages")
        if not isinstance(pkgs, list):
            raise BootlinkError(f"{source}: no 'packages' list: pass a ramdisk manifest.json")
        return {p["name"]: p["version"] for p in pkgs}
    pins: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN_LINE.match(line)
        if not m:
            raise BootlinkError(f"{source}:{n}: expected 'package=version', got {line!r}")
        pins[m.group(1)] = m.group(2)
    return pins


def load_pins(path: Path) -> dict[str, str]:
    try:
        return parse_pins(Path(path).read_text(), str(path))
    except OSError as exc:
        raise BootlinkError(f"cannot read pins file {path}: {exc.strerror}") from None


def apt_preferences(pins: dict[str, str]) -> str:
    """An apt preferences file that forces exactly the pinned versions."""
    return "".join(
        f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n\n"
        for name, version in sorted(pins.items())
    )

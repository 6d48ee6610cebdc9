"""`bootlink ramdisk build`, `bootlink test-qemu server|client`, `bootlink demo`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bootlink.common.errors import BootlinkError

DEFAULT_CACHE = Path(os.environ.get("BOOTLINK_CACHE", "/var/cache/bootlink"))
# Debian packages the build, the QEMU tests and the demo need on the host.
HOST_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "zstd": "zstd",
    "cpio": "cpio",
    "depmod": "kmod",
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.ext4": "e2fsprogs",
    "sfdisk": "fdisk",
    "ip": "iproute2",
    "nbdkit": "nbdkit",
    "/bin/busybox": "busybox-static",
    "cc": "gcc",  # the 1 KB ICU data stub (without it the ramdisk keeps ICU's 30 MB)
}
HOST_PYTHON_MODULES = {"nbd": "python3-libnbd", "pyroute2": "python3-pyroute2"}


def register(sub: argparse._SubParsersAction) -> None:
    rd = sub.add_parser("ramdisk", help="build the shared ramdisk (both roles)")
    rsub = rd.add_subparsers(dest="ramdisk_command", metavar="ACTION", required=True)
    b = rsub.add_parser("build", help="build kernel + ramdisk + manifest into a directory")
    b.add_argument("--config", type=Path, help="config to embed (with its key) as initrd.img")
    b.add_argument("--output", type=Path, required=True, help="output directory")
    b.add_argument("--pins", type=Path, help="package versions: a manifest.json or pins.txt")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download/build cache")
    b.add_argument(
        "--zstd-level", type=int, default=None, help="zstd level (default: fast to unpack)"
    )
    b.add_argument("--with-kexec-tools", action="store_true", help="add kexec-tools (fallback)")
    b.add_argument(
        "--bee", type=Path, metavar="FILE",
        help="carry this Bee binary at /usr/local/bin/bee (for client.bee_node)",
    )  # fmt: skip
    b.add_argument("--kernel", help="kernel package[=version] (default: linux-image-amd64's)")
    b.add_argument("--no-cache", action="store_true", help="rebuild the root and layers")
    b.add_argument("--sources", type=Path, action="append", help="apt sources file(s)")
    b.add_argument("--source-root", type=Path, help="bootlink checkout to install (default: this)")
    b.add_argument(
        "--variant", choices=("slim", "full"), default="slim",
        help="slim: the product; full: stiefelsystem-style minbase with recommends (benchmark)",
    )  # fmt: skip
    b.set_defaults(func=_build)

    t = sub.add_parser("test-qemu", help="boot the ramdisk in QEMU against the other role")
    t.add_argument("role", choices=("server", "client"), help="the role the guest runs")
    t.add_argument(
        "--config", type=Path,
        help="use this config's key on both sides (default: a fresh key); disk, boot files "
        "and interfaces are the test's own",
    )  # fmt: skip
    t.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    t.add_argument("--output", type=Path, default=None, help="build output (default: cache/out)")
    t.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    t.add_argument("--timeout", type=float, default=240.0)
    t.add_argument("--cpus", type=int, default=1)
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.add_argument(
        "--iso-memory", metavar="SIZE!START",
        help="client guest: boot with memmap=SIZE!START, as client.iso_memory does on the "
        "stick (default: --config's client.iso_memory)",
    )  # fmt: skip
    t.set_defaults(func=_test_qemu)

    d = sub.add_parser("demo", help="build everything and boot a laptop disk over NBD in QEMU")
    d.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    d.add_argument("--yes", action="store_true", help="(the default) install without asking")
    d.add_argument(
        "--no-install", action="store_true",
        help="do not apt-get install missing Debian packages (list them and stop)",
    )  # fmt: skip
    d.add_argument("--workdir", type=Path)
    d.set_defaults(func=_demo)


def _build(args: argparse.Namespace) -> int:
    from bootlink.common.config import load_config

    from .build import DEFAULT_ZSTD_LEVEL, BuildOptions, build, source_date_epoch
    from .packages import load_pins

    opts = BuildOptions(
        output=args.output,
        cache=args.cache,
        config=load_config(args.config) if args.config else None,
        pins=load_pins(args.pins) if args.pins else {},
        epoch=source_date_epoch(),
        zstd_level=args.zstd_level or DEFAULT_ZSTD_LEVEL,
        with_kexec_tools=args.with_kexec_tools,
        bee=args.bee,
        kernel_package=args.kernel,
        variant=args.variant,
        use_cache=not args.no_cache,
        sources=tuple(args.sources or ()),
        source_root=args.source_root,
    )
    _check_root("ramdisk build (mmdebstrap --mode=root, chroot)")
    res = build(opts)
    for name, f in res.manifest["files"].items():
        print(f"{res.output / name}  {f['size']}  sha256:{f['sha256']}")
    return 0


def _check_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BootlinkError(f"{what} needs root: run it with sudo")


def missing_host_packages() -> list[str]:
    missing = []
    for prog, pkg in HOST_PACKAGES.items():
        found = (
            Path(prog).exists()
            if prog.startswith("/")
            else shutil.which(prog) or shutil.which(prog, path="/usr/sbin:/sbin")
        )
        if not found and pkg not in missing:
            missing.append(pkg)
    for mod, pkg in HOST_PYTHON_MODULES.items():
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    return missing


def _ensure_host_packages(install: bool) -> None:
    missing = missing_host_packages()
    if not missing:
        return
    if not install:
        raise BootlinkError(
            f"missing Debian packages: {' '.join(missing)}: apt-get install them "
            "(or run without --no-install)"
        )
    print(f"[demo] installing {' '.join(missing)} with apt-get ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env)
    proc = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=False)
    if proc.returncode != 0:
        raise BootlinkError(f"apt-get install {' '.join(missing)} failed: see its output above")


def _test_qemu(args: argparse.Namespace) -> int:
    from . import e2e

    _check_root("test-qemu (network namespaces, tap devices)")
    out = args.output or args.cache / "out"
    art = e2e.prepare(args.cache, out)
    work = e2e.workdir_for(args.workdir)
    run = e2e.run_client_scenario if args.role == "client" else e2e.run_server_scenario
    key_from = None
    iso_memory = args.iso_memory or ""
    if args.config:
        from bootlink.common.config import load_config

        cfg = load_config(args.config)
        key_from = cfg.key_path
        iso_memory = iso_memory or cfg.client.iso_memory
    if args.iso_memory and args.role != "client":
        raise BootlinkError("--iso-memory is for the client guest: run 'test-qemu client'")
    extra = {"iso_memory": iso_memory} if args.role == "client" else {}
    res = run(
        art, work / args.role, timeout=args.timeout, cpus=args.cpus, key_from=key_from, **extra
    )
    _report(res, args.json)
    return 0 if res.ok else 1


def _report(res, as_json: bool) -> None:
    from . import e2e

    if as_json:
        print(json.dumps(e2e.as_dict(res), indent=2, sort_keys=True))
        return
    print(f"{res.scenario} scenario: {'OK' if res.ok else 'FAILED'}")
    for name, t in res.milestones.items():
        print(f"  {t:7.2f} s  {name}")
    if res.marker:
        print(f"  {res.marker}")
    if not res.ok:
        print(res.detail)
    print(f"  console log: {res.console_log}")


def _demo(args: argparse.Namespace) -> int:
    from . import e2e

    _check_root("demo (mmdebstrap, network namespaces, tap devices)")
    _ensure_host_packages(not args.no_install)
    t0 = time.monotonic()
    art = e2e.prepare(args.cache, args.cache / "out")
    t_build = time.monotonic() - t0
    size = art.manifest["files"]["ramdisk.cpio.zst"]["size"]
    print(f"[demo] ramdisk {size / 1e6:.1f} MB ready ({t_build:.0f} s incl. cached steps)",
          file=sys.stderr)  # fmt: skip
    work = e2e.workdir_for(args.workdir)
    print("[demo] booting a desktop (QEMU, 3 NICs) from the ramdisk as client; a laptop "
          "server runs in a namespace on one NIC ...", file=sys.stderr)  # fmt: skip
    res = e2e.run_client_scenario(art, work / "client")
    _report(res, False)
    print("[demo] booting the laptop side (QEMU) from the same ramdisk as server; "
          "`bootlink client --dry-run` finds it from a namespace ...", file=sys.stderr)  # fmt: skip
    srv = e2e.run_server_scenario(art, work / "server")
    _report(srv, False)
    if not (res.ok and srv.ok):
        return 1
    print(f"\n{res.marker}")
    ms = res.milestones
    print(
        f"timings (s after QEMU start): client probing {ms.get('probing', 0):.1f}, server "
        f"found {ms.get('server found', 0):.1f}, kexec {ms.get('kexec', 0):.1f}, laptop root "
        f"over NBD {ms.get('target marker', 0):.1f}; ramdisk {size / 1e6:.1f} MB"
    )
    return 0

"""`bootlink autokexec` and `bootlink setup-server-os`: the laptop's normal OS."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from bootlink.common.config import DEFAULT_CONFIG, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "autokexec",
        help="wait for the link NIC or a desktop's trigger, then become the bootlink server",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (YAML)")
    p.add_argument(
        "--console",
        default="/dev/console",
        help="terminal for the autokexec.confirm question (default /dev/console)",
    )
    p.add_argument(
        "--record",
        metavar="FILE",
        type=Path,
        help="for tests: write what would be kexec'd to FILE (JSON + FILE.initrd), then exit",
    )
    p.set_defaults(func=_autokexec)

    s = sub.add_parser(
        "setup-server-os",
        help="install autokexec, the ramdisk and the NBD-root initrd hook on this laptop",
    )
    s.add_argument("--config", type=Path, help="config file (YAML) to install")
    s.add_argument(
        "--ramdisk", type=Path, help="a 'bootlink ramdisk build' output directory to install"
    )
    s.add_argument("--yes", action="store_true", help="apply every change without asking")
    s.add_argument("--dry-run", action="store_true", help="list the changes, apply none")
    s.add_argument("--uninstall", action="store_true", help="undo what an earlier run installed")
    s.add_argument(
        "--root", type=Path, default=Path("/"), help="operate on the OS tree at DIR (a chroot)"
    )
    s.add_argument(
        "--generator",
        choices=["auto", "initramfs-tools", "dracut"],
        default="auto",
        help="initramfs generator to hook into (default: detect)",
    )
    s.add_argument(
        "--no-initrd", action="store_true", help="install the hook but do not regenerate initrds"
    )
    s.set_defaults(func=_setup)


def _autokexec(args: argparse.Namespace) -> int:
    from .autokexec import Autokexec, ConsoleConfirmer, RecordingExecutor, kexec_executor

    cfg = load_config(args.config)
    executor = RecordingExecutor(args.record) if args.record else kexec_executor
    daemon = Autokexec(cfg, executor=executor, confirmer=ConsoleConfirmer(args.console))

    def on_signal(_signum, _frame):
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run()


def _setup(args: argparse.Namespace) -> int:
    from .setup_os import run_setup

    return run_setup(args)

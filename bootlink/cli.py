"""The `bootlink` command: one subcommand per job, each defined next to the code it drives.

Each module listed in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommand(s) and sets `func(args) -> int`. Expected failures raise BootlinkError and
become one line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bootlink.common.errors import BootlinkError
from bootlink.common.log import setup_logging

COMMAND_MODULES = [
    "bootlink.common.keys_cli",
    "bootlink.server.cli",
    "bootlink.server.autokexec_cli",
    "bootlink.client.cli",
    "bootlink.client.sources.cli",
    "bootlink.ramdisk.cli",
    "bootlink.usb.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootlink", description="Boot your laptop's own disk on another PC over a cable."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except BootlinkError as exc:
        print(f"bootlink {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("bootlink").info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

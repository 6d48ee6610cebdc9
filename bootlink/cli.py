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

# module -> the subcommands it registers. Only the module of the command being run is
# imported (the ramdisk runs `bootlink client` under emulation, where importing every
# other command's dependencies costs seconds); --help imports them all.
COMMAND_MODULES = {
    "bootlink.common.keys_cli": ["keygen"],
    "bootlink.server.cli": ["server"],
    "bootlink.server.autokexec_cli": ["autokexec", "setup-server-os"],
    "bootlink.client.cli": ["client"],
    "bootlink.client.sources.cli": ["sign-key", "ref", "publish", "fetch"],
    "bootlink.ramdisk.cli": ["ramdisk", "test-qemu", "demo"],
    "bootlink.usb.cli": ["usb"],
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootlink", description="Boot your laptop's own disk on another PC over a cable."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    wanted = [m for m, cmds in COMMAND_MODULES.items() if words and words[0] in cmds]
    for name in wanted or COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
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

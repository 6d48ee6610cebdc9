"""`bootlink client`: the desktop side."""

from __future__ import annotations

import argparse

from bootlink.common.config import DEFAULT_CONFIG, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="find the laptop (or another source) and boot it")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (YAML)")
    p.add_argument("--dry-run", action="store_true", help="do everything but the kexec")
    p.add_argument("--json", action="store_true", help="print the boot plan as JSON on stdout")
    p.set_defaults(func=_client)


def _client(args: argparse.Namespace) -> int:
    from .boot import run_client

    return run_client(load_config(args.config), dry_run=args.dry_run, as_json=args.json)

"""`bootlink server`: run the laptop side of the link."""

from __future__ import annotations

import argparse

from bootlink.common.config import DEFAULT_CONFIG, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="serve this machine's disk and boot files over the link")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (YAML)")
    p.set_defaults(func=_server)


def _server(args: argparse.Namespace) -> int:
    from .main import run_server

    return run_server(load_config(args.config))

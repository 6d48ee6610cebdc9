"""`bootlink keygen`: make the shared key both machines hold."""

from __future__ import annotations

import argparse
from pathlib import Path

from .keys import generate_key_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create the shared 32-byte key (mode 0600)")
    p.add_argument("--key", type=Path, default=Path("/etc/bootlink/key"), help="key file to write")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    key = generate_key_file(args.key, force=args.force)
    print(f"wrote {args.key} (key id {key.key_id()}); copy it to the other machine, mode 0600")
    return 0

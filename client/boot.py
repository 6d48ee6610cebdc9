"""`bootlink client`: gather BootImages from the configured sources, pick one, kexec it.

`--dry-run` does everything but the kexec; `--json` prints the plan (a contract:
{"interface", "server", "kernel_sha256", "initrd_sha256", "cmdline", "nbd_uri"}, extended
with more keys, never renamed).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from bootlink.common import kexec
from bootlink.common.bootimage import BootImage
from bootlink.common.config import Config

from .link_source import boot_from_link

log = logging.getLogger("bootlink.client")


def plan_of(image: BootImage) -> dict[str, Any]:
    return {
        "interface": image.extra.get("interface", ""),
        "server": image.provenance.locator,
        "kernel_sha256": image.kernel_sha256,
        "initrd_sha256": image.initrd_sha256,
        "cmdline": image.cmdline,
        "nbd_uri": image.extra.get("nbd_uri", ""),
        # extensions
        "label": image.label,
        "source": image.provenance.source,
        "verified_by": image.provenance.verified_by,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd) if image.initrd else "",
    }


def choose_image(cfg: Config, progress: bool) -> BootImage:
    return boot_from_link(cfg, progress=progress).image


def run_client(cfg: Config, dry_run: bool, as_json: bool) -> int:
    image = choose_image(cfg, progress=not as_json)
    plan = plan_of(image)
    if as_json:
        print(json.dumps(plan, indent=2, sort_keys=True))
    else:
        print(f"boot: {image.describe()}\ncmdline: {image.cmdline}", file=sys.stderr)
    if dry_run:
        log.info("dry run: not executing kexec")
        return 0
    kexec.load_and_execute(image)
    return 1  # not reached: load_and_execute raises if the kexec does not happen

"""Boot image sources: one spec string in, verified BootImages out.

A spec is what `client.sources` lists in the config: `link` (the laptop over the cable),
`swarm:<ref>`, `ipfs:<cid>`, `https://host/path[#sha256=HEX]` (`http:` likewise) or
`iso:/path/file.iso` / `iso:https://...#sha256=HEX`. `resolve()` dispatches on the text
before the first colon through SOURCE_KINDS.

Extension hook: SOURCE_KINDS maps a kind to `fn(spec, cfg, workdir, progress) ->
list[BootImage]`. The laptop link registers itself from the client package:

    from bootlink.client.sources import SOURCE_KINDS
    SOURCE_KINDS["link"] = resolve_link

so this package does not import the link code (and stays importable without it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from bootlink.common.bootimage import BootImage
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError
from bootlink.common.output_file import make_dir, removed_on_failure

from .resolvers import (
    Resolver,
    made_for,
    resolve_ipfs,
    resolve_iso,
    resolve_swarm,
    resolve_web,
    spec_kind,
)

log = logging.getLogger("bootlink.sources")

SOURCE_KINDS: dict[str, Resolver] = {
    "swarm": resolve_swarm,
    "ipfs": resolve_ipfs,
    "https": resolve_web,
    "http": resolve_web,
    "iso": resolve_iso,
    # "link": added by the client package (see the module docstring)
}


def resolve(spec: str, cfg: Config, workdir: Path, progress: bool = True) -> list[BootImage]:
    """Fetch and verify what `spec` names; every returned image is safe to kexec."""
    kind = spec_kind(spec)
    fn = SOURCE_KINDS.get(kind)
    if fn is None:
        known = ", ".join(sorted(SOURCE_KINDS))
        raise BootlinkError(f"source '{spec}': unknown kind '{kind}'; known kinds: {known}")
    with removed_on_failure(workdir, made_for(spec.strip())):
        make_dir(workdir)
        return fn(spec.strip(), cfg, workdir, progress)


def resolve_all(
    cfg: Config, workdir: Path, progress: bool = True, specs: list[str] | None = None
) -> tuple[list[BootImage], list[str]]:
    """Images from every configured source, in config order; failures as one-line errors.

    One unreachable source must not stop the others: the menu shows what did resolve.
    """
    images: list[BootImage] = []
    errors: list[str] = []
    for spec in specs if specs is not None else cfg.client.sources:
        try:
            images.extend(resolve(spec, cfg, workdir, progress))
        except BootlinkError as exc:
            log.warning("source %s: %s", spec, exc)
            errors.append(f"{spec}: {exc}")
    return images, errors


__all__ = ["SOURCE_KINDS", "resolve", "resolve_all", "spec_kind"]

"""Turn a source spec into verified BootImages: swarm:, ipfs:, http(s):, iso:.

Swarm and IPFS specs name a signed image manifest (see common/signing.py); its files are
fetched by their references and checked against the sizes and SHA-256s it pins. A web
spec names a manifest or an ISO and pins its SHA-256 in the spec, or names a manifest
signed by a trusted key. An iso: spec names an ISO on a local disk (the USB stick) or on
the web (then with #sha256=). Every BootImage's provenance says what verified it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from bootlink.common import ipfs as ipfs_codec
from bootlink.common import swarm as swarm_codec
from bootlink.common.bootimage import BootImage, Provenance, sha256_file
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError, ConfigError
from bootlink.common.output_file import make_dir
from bootlink.common.signing import (
    MAX_ENVELOPE,
    FileEntry,
    ManifestError,
    looks_like_envelope,
    parse_envelope,
    parse_public_key,
    verify_envelope,
)

from . import ipfs, iso, swarm, web
from ._http import TooLarge

log = logging.getLogger("bootlink.sources")

MAX_BOOT_FILE = 1 << 36  # 64 GiB: anything bigger is not a kernel, initrd or squashfs

Resolver = Callable[[str, Config, Path, bool], list[BootImage]]


# ---------------------------------------------------------------- spec helpers


def spec_kind(spec: str) -> str:
    s = spec.strip()
    if s == "link":
        return "link"
    scheme, sep, _ = s.partition(":")
    if not sep:
        raise BootlinkError(
            f"source '{spec}' has no kind: use link, swarm:<ref>, ipfs:<cid>, "
            "https://...#sha256=..., or iso:/path/to/file.iso"
        )
    return scheme.lower()


def strip_kind(spec: str, kind: str) -> str:
    rest = spec.strip()[len(kind) + 1 :]
    return rest[2:] if rest.startswith("//") else rest


def _spec_tag(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def spec_dir(workdir: Path, spec: str, kind: str) -> Path:
    return make_dir(workdir / f"{kind}-{_spec_tag(spec)}")


def made_for(spec: str) -> Callable[[str], bool]:
    """Whether a name in the download folder is one spec_dir() makes for `spec`."""
    tail = "-" + _spec_tag(spec)
    return lambda name: name.endswith(tail)


def is_allowed_unsigned(spec: str, cfg: Config) -> bool:
    """client.allow_unsigned lists specs (or shell-style patterns) trusted without signature."""
    return any(spec == p or fnmatch.fnmatchcase(spec, p) for p in cfg.client.allow_unsigned)


def trusted_keys(cfg: Config) -> list[bytes]:
    keys = []
    for i, entry in enumerate(cfg.client.trusted_keys):
        try:
            keys.append(parse_public_key(entry, where=f"client.trusted_keys[{i}]"))
        except BootlinkError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    return keys


# ---------------------------------------------------------------- file fetching


def fetch_reference(
    reference: str,
    dest: Path,
    cfg: Config,
    *,
    base_url: str | None,
    expected_sha256: str | None,
    max_size: int,
    progress: bool,
    label: str,
) -> str:
    """Fetch one file named by a manifest; return how its transport verified it."""
    kind = reference.partition(":")[0].lower() if ":" in reference else ""
    timeout = cfg.client.timeout
    if kind == "swarm":
        ref = swarm_codec.parse_reference(strip_kind(reference, "swarm"))
        got = swarm.fetch(
            ref,
            cfg.client.bee_api,
            dest,
            timeout=timeout,
            progress=progress,
            max_size=max_size,
            label=label,
        )
        return got.verified_by
    if kind == "ipfs":
        try:
            cid = ipfs_codec.CID.parse(strip_kind(reference, "ipfs"))
        except ValueError as exc:
            raise ManifestError(f"manifest reference '{reference}': {exc}") from None
        got = ipfs.fetch(
            cid,
            cfg.client.ipfs_gateway,
            dest,
            timeout=timeout,
            progress=progress,
            max_size=max_size,
            label=label,
        )
        return got.verified_by
    if kind in ("http", "https") or (base_url and not kind):
        url = urllib.parse.urljoin(base_url or "", reference)
        web.fetch(
            url,
            dest,
            sha256=expected_sha256,
            timeout=timeout,
            progress=progress,
            max_size=max_size,
            label=label,
        )
        return "sha256"
    raise ManifestError(f"manifest reference '{reference}' is not swarm:, ipfs: or an http(s) URL")


def image_from_envelope(
    spec: str,
    data: bytes,
    cfg: Config,
    d: Path,
    *,
    kind: str,
    locator: str,
    transport: str,
    base_url: str | None = None,
    pinned: bool = False,
    progress: bool = True,
) -> BootImage:
    """Verify a manifest envelope, fetch and check its files, build the BootImage."""
    env = parse_envelope(data)
    verdict = verify_envelope(
        env,
        trusted_keys(cfg),
        allow_unsigned=pinned or is_allowed_unsigned(spec, cfg),
        where=spec,
    )
    m = verdict.manifest
    paths: dict[str, Path] = {}
    for role, entry in sorted(m.files.items()):
        dest = d / f"{role}-{entry.name}"
        how = fetch_reference(
            entry.reference,
            dest,
            cfg,
            base_url=base_url,
            expected_sha256=entry.sha256,
            max_size=entry.size,
            progress=progress,
            label=f"{role} {entry.name}",
        )
        _check_file(dest, entry, role, spec)
        log.debug("%s %s verified (%s, sha256)", role, entry.name, how)
        paths[role] = dest
    if verdict.key is not None:
        trust = verdict.describe()
    elif pinned:
        trust = "manifest sha256 pinned in the source spec"
    else:
        trust = verdict.describe()
    extra = {"manifest": spec}
    if "rootfs" in paths:
        extra["rootfs"] = str(paths["rootfs"])
        extra["rootfs_sha256"] = m.files["rootfs"].sha256
    if verdict.key is not None:
        extra["signer"] = verdict.key.hex()
    return BootImage(
        label=m.label,
        kernel=paths["kernel"],
        initrd=paths.get("initrd"),
        cmdline=m.cmdline,
        provenance=Provenance(kind, locator, f"{trust}; manifest via {transport}; files by sha256"),
        kernel_sha256=m.files["kernel"].sha256,
        initrd_sha256=m.files["initrd"].sha256 if "initrd" in m.files else "",
        extra=extra,
    )


def _check_file(path: Path, entry: FileEntry, role: str, spec: str) -> None:
    size = path.stat().st_size
    if size != entry.size:
        raise ManifestError(
            f"{role} {entry.name} of {spec} is {size} bytes, but the manifest says "
            f"{entry.size}: refused; the manifest and the published files disagree"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ManifestError(
            f"{role} {entry.name} of {spec} has sha256 {digest[:16]}..., but the manifest "
            f"pins {entry.sha256[:16]}...: refused; the published file was changed"
        )


def _not_manifest(spec: str, size: int | None) -> BootlinkError:
    what = f"{size} bytes" if size is not None else f"over {MAX_ENVELOPE} bytes"
    return ManifestError(
        f"{spec} is not a bootlink image manifest ({what}): publish images with "
        "'bootlink publish'; to download a single file use 'bootlink fetch'"
    )


# ---------------------------------------------------------------- resolvers


def resolve_swarm(spec: str, cfg: Config, workdir: Path, progress: bool = True) -> list[BootImage]:
    ref = swarm_codec.parse_reference(strip_kind(spec, "swarm"))
    return _resolve_manifest(
        spec,
        cfg,
        workdir,
        "swarm",
        ref.hex(),
        lambda dest: swarm.fetch(
            ref,
            cfg.client.bee_api,
            dest,
            timeout=cfg.client.timeout,
            progress=False,
            max_size=MAX_ENVELOPE,
        ),
        lambda got: f"Bee {got.bee} ({got.verified_by})",
        progress,
    )


def resolve_ipfs(spec: str, cfg: Config, workdir: Path, progress: bool = True) -> list[BootImage]:
    try:
        cid = ipfs_codec.CID.parse(strip_kind(spec, "ipfs"))
    except ValueError as exc:
        raise BootlinkError(f"source '{spec}': {exc}") from None
    return _resolve_manifest(
        spec,
        cfg,
        workdir,
        "ipfs",
        str(cid),
        lambda dest: ipfs.fetch(
            cid,
            cfg.client.ipfs_gateway,
            dest,
            timeout=cfg.client.timeout,
            progress=False,
            max_size=MAX_ENVELOPE,
        ),
        lambda got: f"gateway {got.gateway} ({got.verified_by})",
        progress,
    )


def _resolve_manifest(spec, cfg, workdir, kind, locator, fetch, transport, progress):
    """Fetch a signed image manifest by content address (verified by the transport), then
    the image it describes."""
    d = spec_dir(workdir, spec, kind)
    dest = d / "manifest.json"
    try:
        got = fetch(dest)
    except TooLarge:
        raise _not_manifest(spec, None) from None
    data = dest.read_bytes()
    if not looks_like_envelope(data):
        raise _not_manifest(spec, len(data))
    return [
        image_from_envelope(
            spec,
            data,
            cfg,
            d,
            kind=kind,
            locator=locator,
            transport=transport(got),
            progress=progress,
        )
    ]


def is_iso_file(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0x8001)
        return f.read(5) == b"CD001"


def resolve_web(spec: str, cfg: Config, workdir: Path, progress: bool = True) -> list[BootImage]:
    ws = web.WebSpec.parse(spec)
    d = spec_dir(workdir, spec, "web")
    dest = d / "download"
    # Without a pinned hash only a (small) signed manifest is acceptable: cap the download.
    limit = MAX_BOOT_FILE if ws.sha256 else MAX_ENVELOPE
    try:
        got = web.fetch(
            ws.url,
            dest,
            sha256=ws.sha256,
            timeout=cfg.client.timeout,
            progress=progress,
            max_size=limit,
        )
    except TooLarge:
        if ws.sha256:
            raise
        raise _needs_hash(spec) from None
    head = dest.read_bytes()[:MAX_ENVELOPE] if got.size <= MAX_ENVELOPE else b""
    if head and looks_like_envelope(head):
        return [
            image_from_envelope(
                spec,
                head,
                cfg,
                d,
                kind="web",
                locator=ws.url,
                transport=f"{ws.url}",
                base_url=ws.url,
                pinned=ws.sha256 is not None,
                progress=progress,
            )
        ]
    if ws.sha256 is None:
        raise _needs_hash(spec)
    if is_iso_file(dest):
        iso_path = dest.rename(d / "image.iso")
        return [
            iso.image_from_iso(
                iso_path,
                d,
                source="web",
                locator=ws.url,
                verified_by=f"sha256 {ws.sha256[:16]}... pinned in the source spec",
                downloaded=True,
            )
        ]
    raise BootlinkError(
        f"{spec}: the file matches its sha256 but is neither a bootlink manifest nor an ISO"
    )


def _needs_hash(spec: str) -> BootlinkError:
    return BootlinkError(
        f"{spec} is not a signed manifest, so it needs its hash: append "
        "#sha256=<64 hex digits> to the URL"
    )


def resolve_iso(spec: str, cfg: Config, workdir: Path, progress: bool = True) -> list[BootImage]:
    rest = strip_kind(spec, "iso")
    if rest.startswith(("http://", "https://")):
        ws = web.WebSpec.parse(rest)
        if ws.sha256 is None:
            raise BootlinkError(f"{spec}: an ISO from the web needs #sha256=<hex> in the spec")
        d = spec_dir(workdir, spec, "iso")
        dest = d / "image.iso"
        web.fetch(ws.url, dest, sha256=ws.sha256, timeout=cfg.client.timeout, progress=progress)
        return [
            iso.image_from_iso(
                dest,
                d,
                source="iso",
                locator=ws.url,
                verified_by=f"sha256 {ws.sha256[:16]}... pinned in the source spec",
                downloaded=True,
            )
        ]
    path_text, _, frag = rest.partition("#")
    path = Path(path_text)
    if not path.is_file():
        raise BootlinkError(
            f"{spec}: no such ISO file {path}; check the path (is the disk mounted?)"
        )
    verified_by = "local file named in the config"
    if frag:
        pinned = web.sha256_from_fragment(frag, spec)
        digest = sha256_file(path)
        if digest != pinned:
            raise BootlinkError(
                f"{path} has sha256 {digest[:16]}..., not the pinned {pinned[:16]}...: refused"
            )
        verified_by = f"sha256 {pinned[:16]}... pinned in the source spec"
    d = spec_dir(workdir, spec, "iso")
    return [
        iso.image_from_iso(
            path,
            d,
            source="iso",
            locator=str(path),
            verified_by=verified_by,
            location=iso.locate(path),
        )
    ]

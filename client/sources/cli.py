"""Subcommands for decentralised images: sign-key, ref, publish, fetch.

bootlink sign-key --key PATH             make an Ed25519 signing key, print its public key
bootlink ref swarm FILE                  the Swarm reference FILE gets (offline)
bootlink ref ipfs [--layout L] FILE      the IPFS CID FILE gets in layout L (offline)
bootlink publish --config F --to swarm|ipfs|dir ...
                                         upload kernel+initrd(+rootfs) and a signed manifest
bootlink fetch SPEC --output F           download one file and verify it
bootlink fetch SPEC --image --output DIR resolve a boot image (manifest, ISO) and verify it
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bootlink.common import ipfs as ipfs_codec
from bootlink.common import swarm as swarm_codec
from bootlink.common.bootimage import sha256_file
from bootlink.common.config import Config, load_config
from bootlink.common.errors import BootlinkError
from bootlink.common.log import Progress
from bootlink.common.output_file import OutputFile, make_dir
from bootlink.common.signing import (
    FileEntry,
    Manifest,
    fingerprint,
    generate_signing_key,
    load_signing_key,
    manifest_from_dict,
    public_bytes,
    sign_manifest,
    unsigned_envelope,
)

from . import ipfs, swarm, web
from .resolvers import spec_kind, strip_kind

DEFAULT_IPFS_API = "http://localhost:5001"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sign-key", help="create an Ed25519 key for signing image manifests")
    p.add_argument("--key", type=Path, required=True, help="private key file to write (0600)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=_sign_key)

    p = sub.add_parser("ref", help="print the Swarm reference or IPFS CID of a file, offline")
    p.add_argument("network", choices=["swarm", "ipfs"])
    p.add_argument("file", type=Path)
    p.add_argument(
        "--layout",
        choices=sorted(ipfs_codec.LAYOUTS),
        default=ipfs_codec.DEFAULT_LAYOUT,
        help="IPFS DAG layout (default kubo-v0, what 'ipfs add' does by default)",
    )
    p.set_defaults(func=_ref)

    p = sub.add_parser("publish", help="upload a boot image and its signed manifest")
    p.add_argument("--config", type=Path, help="config whose server.boot gives the files")
    p.add_argument("--to", choices=["swarm", "ipfs", "dir"], required=True)
    p.add_argument(
        "--api",
        help=f"Bee API (default client.bee_api) or kubo RPC API URL (default {DEFAULT_IPFS_API})",
    )
    p.add_argument("--output", type=Path, help="--to dir: directory for files + manifest.json")
    p.add_argument("--sign-key", type=Path, help="Ed25519 key from 'bootlink sign-key'")
    p.add_argument("--unsigned", action="store_true", help="publish without a signature")
    p.add_argument("--kernel", type=Path)
    p.add_argument("--initrd", type=Path)
    p.add_argument("--rootfs", type=Path, help="optional root squashfs")
    p.add_argument("--cmdline", help="kernel command line (default server.boot.cmdline)")
    p.add_argument("--label", help="menu label (default: kernel file name)")
    p.add_argument("--batch", help="Swarm postage batch id (default: first usable one)")
    p.add_argument("--layout", choices=sorted(ipfs_codec.LAYOUTS), default="kubo-v1")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_publish)

    p = sub.add_parser("fetch", help="download and verify swarm:/ipfs:/https: content")
    p.add_argument("spec", help="swarm:<ref> | ipfs:<cid> | https://...#sha256=HEX | iso:...")
    p.add_argument("--output", type=Path, required=True, help="file (or directory with --image)")
    p.add_argument("--config", type=Path, help="config for trusted keys, Bee and gateway URLs")
    p.add_argument(
        "--bee", help="Bee API URL (default: the node client.bee_node starts, or client.bee_api)"
    )
    p.add_argument("--gateway", help="IPFS trustless gateway URL (default client.ipfs_gateway)")
    p.add_argument("--mode", choices=ipfs.MODES, default="car", help="IPFS: one CAR or raw blocks")
    p.add_argument(
        "--swarm-mode",
        choices=swarm.MODES,
        default="stream",
        help="Swarm: tree via /chunks + data via /bytes (stream), or all via /chunks",
    )
    p.add_argument(
        "--image",
        action="store_true",
        help="SPEC names a boot image (manifest or ISO): verify it, print it as JSON",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_fetch)


def _sign_key(args: argparse.Namespace) -> int:
    public = generate_signing_key(args.key, force=args.force)
    print(public.hex())
    print(
        f"wrote {args.key} (mode 0600, key {fingerprint(public)}); on clients add the line "
        f"above to client.trusted_keys",
        file=sys.stderr,
    )
    return 0


def _ref(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise BootlinkError(f"{path}: {what}; name the file to hash")
    size = path.stat().st_size
    prog = Progress(f"hashing {path.name}", size) if size > 64 << 20 else None
    if args.network == "swarm":
        print(swarm_codec.reference_of_file(path, progress=prog).hex())
    else:
        print(ipfs_codec.cid_of_file(path, args.layout, progress=prog))
    return 0


# ---------------------------------------------------------------- publish


def _publish(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else Config()
    boot = cfg.server.boot
    kernel = args.kernel or Path(boot.kernel)
    initrd = args.initrd or Path(boot.initrd)
    cmdline = args.cmdline if args.cmdline is not None else boot.cmdline
    files = {"kernel": kernel, "initrd": initrd}
    if args.rootfs:
        files["rootfs"] = args.rootfs
    for role, path in files.items():
        if not path.is_file():
            raise BootlinkError(f"{role} {path} is not a file: pass --{role} PATH")
        if role != "rootfs" and path.stat().st_size == 0:
            raise BootlinkError(f"{role} {path} is empty: pass the real --{role} PATH")
    if args.sign_key and args.unsigned:
        raise BootlinkError("--sign-key and --unsigned contradict each other: pass one of them")
    if not args.sign_key and not args.unsigned:
        raise BootlinkError(
            "publish needs --sign-key PATH (make one with 'bootlink sign-key'), or --unsigned "
            "for a source that clients list in client.allow_unsigned"
        )
    key = load_signing_key(args.sign_key) if args.sign_key else None
    progress = not args.quiet
    entries: dict[str, FileEntry] = {}
    for role, path in files.items():
        ref = _upload(args, cfg, path, progress)
        entries[role] = FileEntry(path.name, path.stat().st_size, sha256_file(path), ref)
    manifest = Manifest(args.label or kernel.name, cmdline, entries)
    manifest_from_dict(manifest.to_dict())  # refuse now what clients would refuse later
    env = sign_manifest(manifest, key) if key else unsigned_envelope(manifest)
    data = env.to_bytes()
    tmpdir = Path(tempfile.mkdtemp(prefix="bootlink-publish-"))
    try:
        mpath = tmpdir / "manifest.json"
        mpath.write_bytes(data)
        spec = _upload(args, cfg, mpath, progress=False)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    signer = f"signed by key {fingerprint(public_bytes(key))}" if key else "unsigned"
    if args.to == "dir":
        print(args.output / spec)
        print(
            f"wrote '{manifest.label}' ({signer}) to {args.output}: serve that directory over "
            "https and add https://HOST/PATH/manifest.json to client.sources",
            file=sys.stderr,
        )
        return 0
    print(spec)
    print(
        f"published '{manifest.label}' ({signer}); clients: add {spec} to client.sources",
        file=sys.stderr,
    )
    return 0


def _upload(args: argparse.Namespace, cfg: Config, path: Path, progress: bool) -> str:
    """Upload one file; return the reference the manifest records for it."""
    if args.to == "swarm":
        api = args.api or cfg.client.bee_api
        if not getattr(args, "_batch", None):
            args._batch = args.batch or swarm.find_batch(api, cfg.client.timeout)
        ref = swarm.upload_file(path, api, args._batch, progress=progress)
        return f"swarm:{ref.hex()}"
    if args.to == "ipfs":
        api = args.api or DEFAULT_IPFS_API
        cid = ipfs.add_file(path, api, args.layout, progress=progress)
        return f"ipfs:{cid}"
    if not args.output:
        raise BootlinkError("--to dir needs --output DIR")
    with OutputFile(make_dir(args.output) / path.name) as out, open(path, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
        out.commit()
    return path.name  # relative to the manifest's URL


# ---------------------------------------------------------------- fetch


def _fetch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else Config()
    if args.bee or args.gateway:
        client = dataclasses.replace(
            cfg.client,
            bee_api=args.bee or cfg.client.bee_api,
            ipfs_gateway=args.gateway or cfg.client.ipfs_gateway,
        )
        cfg = dataclasses.replace(cfg, client=client)
    with contextlib.ExitStack() as stack:
        if spec_kind(args.spec) == "swarm" and cfg.client.bee_node and not args.bee:
            from bootlink.client import bee_node  # the node the config says to run

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bootlink-bee-"))
            cfg = stack.enter_context(bee_node.using_node(cfg, Path(tmp)))
        return _fetch_with(args, cfg)


def _fetch_with(args: argparse.Namespace, cfg: Config) -> int:
    progress = not args.quiet
    if args.image:
        from . import resolve

        images = resolve(args.spec, cfg, args.output, progress=progress)
        print(json.dumps([_image_json(i) for i in images], indent=2, sort_keys=True))
        return 0
    kind = spec_kind(args.spec)
    out: Path = args.output
    if out.is_dir():
        raise BootlinkError(
            f"--output {out} is a directory: name the file to write (a directory is for --image)"
        )
    if kind == "swarm":
        ref = swarm_codec.parse_reference(strip_kind(args.spec, "swarm"))
        got = swarm.fetch(
            ref,
            cfg.client.bee_api,
            out,
            timeout=cfg.client.timeout,
            progress=progress,
            mode=args.swarm_mode,
        )
        how = got.verified_by
    elif kind == "ipfs":
        try:
            cid = ipfs_codec.CID.parse(strip_kind(args.spec, "ipfs"))
        except ValueError as exc:
            raise BootlinkError(f"'{args.spec}': {exc}") from None
        got = ipfs.fetch(
            cid,
            cfg.client.ipfs_gateway,
            out,
            mode=args.mode,
            timeout=cfg.client.timeout,
            progress=progress,
        )
        how = got.verified_by
    elif kind in ("http", "https"):
        ws = web.WebSpec.parse(args.spec)
        if ws.sha256 is None:
            raise BootlinkError(
                f"{args.spec}: a web download is verified by its hash: append "
                "#sha256=<64 hex digits> (or use --image for a signed manifest)"
            )
        web.fetch(ws.url, out, sha256=ws.sha256, timeout=cfg.client.timeout, progress=progress)
        how = "sha256 pinned in the spec"
    else:
        hint = " (an iso: source gives a boot image: add --image)" if kind == "iso" else ""
        raise BootlinkError(f"fetch takes swarm:, ipfs: or http(s): specs, not '{kind}:'{hint}")
    size = out.stat().st_size
    print(f"wrote {out} ({size} bytes, sha256 {sha256_file(out)}); verified: {how}")
    return 0


def _image_json(image) -> dict:
    return {
        "label": image.label,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd) if image.initrd else "",
        "cmdline": image.cmdline,
        "kernel_sha256": image.kernel_sha256,
        "initrd_sha256": image.initrd_sha256,
        "source": image.provenance.source,
        "locator": image.provenance.locator,
        "verified_by": image.provenance.verified_by,
        "extra": dict(image.extra),
    }

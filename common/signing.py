"""Ed25519-signed image manifests: what a published boot image is, and who vouches for it.

A manifest names the image's files (kernel, initrd, optionally a root squashfs) with
size, SHA-256 and where to fetch them, plus the kernel command line and a label. It is
published inside a small JSON *envelope* next to detached signatures:

    {"manifest": {...}, "signatures": [{"alg": "ed25519", "key": HEX, "sig": HEX}]}

The signature covers `SIGNING_CONTEXT + canonical_bytes(manifest)` (sorted keys, no
spaces, ASCII), so re-serialising the envelope never invalidates it, and the context
prefix keeps a bootlink signature from being valid for anything else.

The parser is strict: unknown keys, bad types, unsafe names or cmdlines with newlines are
refused, because everything in a manifest ends up on a kernel command line or a path.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import BootlinkError, KeyFileError
from .keys import check_new_private_path, write_private_file

MANIFEST_VERSION = 1
SIGNING_CONTEXT = b"bootlink image manifest v1\0"
FILE_ROLES = ("kernel", "initrd", "rootfs")
REQUIRED_ROLES = ("kernel", "initrd")
MAX_ENVELOPE = 64 * 1024  # a manifest is a few hundred bytes; refuse anything silly
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestError(BootlinkError):
    """A manifest or envelope is malformed, unsigned, or signed by the wrong key."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    reference: str  # "swarm:<hex>", "ipfs:<cid>", an https URL, or a URL relative to the manifest

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "reference": self.reference,
        }


@dataclass(frozen=True)
class Manifest:
    label: str
    cmdline: str
    files: dict[str, FileEntry]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "label": self.label,
            "cmdline": self.cmdline,
            "files": {role: f.to_dict() for role, f in sorted(self.files.items())},
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------- parsing


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(f"invalid image manifest: {what}")


def _only_keys(d: dict, allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    _expect(not extra, f"unknown key(s) {', '.join(sorted(map(str, extra)))} in {where}")


def manifest_from_dict(d: Any) -> Manifest:
    _expect(isinstance(d, dict), "manifest must be a JSON object")
    _only_keys(d, {"version", "label", "cmdline", "files"}, "manifest")
    _expect(d.get("version") == MANIFEST_VERSION, f"version must be {MANIFEST_VERSION}")
    label, cmdline, files = d.get("label"), d.get("cmdline", ""), d.get("files")
    _expect(isinstance(label, str) and 0 < len(label) <= 200, "label must be 1..200 characters")
    _expect(label.isprintable(), "label must be printable text")
    _expect(isinstance(cmdline, str) and len(cmdline) <= 4096, "cmdline must be text <= 4096")
    _expect(cmdline.isprintable(), "cmdline must be one line of printable text")
    _expect(isinstance(files, dict), "files must be an object")
    _only_keys(files, set(FILE_ROLES), "files")
    for role in REQUIRED_ROLES:
        _expect(role in files, f"files.{role} is missing")
    entries = {role: _file_from_dict(role, f) for role, f in files.items()}
    return Manifest(label, cmdline, entries)


def _file_from_dict(role: str, f: Any) -> FileEntry:
    where = f"files.{role}"
    _expect(isinstance(f, dict), f"{where} must be an object")
    _only_keys(f, {"name", "size", "sha256", "reference"}, where)
    name, size, digest, ref = f.get("name"), f.get("size"), f.get("sha256"), f.get("reference")
    _expect(
        isinstance(name, str)
        and 0 < len(name) <= 255
        and "/" not in name
        and "\0" not in name
        and name not in (".", "..")
        and name.isprintable(),
        f"{where}.name must be a plain file name",
    )
    _expect(
        isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 1 << 40,
        f"{where}.size must be a byte count",
    )
    _expect(
        isinstance(digest, str) and _HEX64.fullmatch(digest) is not None,
        f"{where}.sha256 must be 64 lowercase hex digits",
    )
    _expect(
        isinstance(ref, str) and 0 < len(ref) <= 2048 and ref.isprintable(),
        f"{where}.reference must be a non-empty reference",
    )
    return FileEntry(name, size, digest, ref)


@dataclass(frozen=True)
class Signature:
    key: bytes  # 32-byte raw Ed25519 public key
    sig: bytes  # 64 bytes


@dataclass(frozen=True)
class Envelope:
    manifest: Manifest
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "manifest": self.manifest.to_dict(),
            "signatures": [
                {"alg": "ed25519", "key": s.key.hex(), "sig": s.sig.hex()} for s in self.signatures
            ],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


def looks_like_envelope(data: bytes) -> bool:
    """Cheap sniff: is this plausibly a bootlink manifest envelope (vs. a kernel, an ISO)?"""
    head = data[:64].lstrip()
    return head.startswith(b"{") and b'"manifest"' in data[:MAX_ENVELOPE]


def parse_envelope(data: bytes) -> Envelope:
    _expect(len(data) <= MAX_ENVELOPE, f"envelope is {len(data)} bytes, over {MAX_ENVELOPE}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ManifestError("invalid image manifest: not UTF-8 JSON") from None
    _expect(isinstance(doc, dict), "envelope must be a JSON object")
    _only_keys(doc, {"manifest", "signatures"}, "envelope")
    manifest = manifest_from_dict(doc.get("manifest"))
    sigs_raw = doc.get("signatures", [])
    _expect(isinstance(sigs_raw, list) and len(sigs_raw) <= 16, "signatures must be a list")
    sigs = []
    for i, s in enumerate(sigs_raw):
        _expect(isinstance(s, dict), f"signatures[{i}] must be an object")
        _only_keys(s, {"alg", "key", "sig"}, f"signatures[{i}]")
        _expect(s.get("alg") == "ed25519", f"signatures[{i}].alg must be ed25519")
        try:
            key, sig = bytes.fromhex(s.get("key", "")), bytes.fromhex(s.get("sig", ""))
        except (TypeError, ValueError):
            key, sig = b"", b""
        _expect(
            len(key) == 32 and len(sig) == 64, f"signatures[{i}] needs a 32-byte key, 64-byte sig"
        )
        sigs.append(Signature(key, sig))
    return Envelope(manifest, tuple(sigs))


# ---------------------------------------------------------------- keys


def fingerprint(public_key: bytes) -> str:
    return public_key.hex()[:16]


def generate_signing_key(path: Path, *, force: bool = False) -> bytes:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600); return its public key."""
    path = check_new_private_path(path, force=force)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem)
    return public_bytes(key)


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"signing key {path} not found: create one with 'bootlink sign-key --key {path}'"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077 and stat.S_ISREG(st.st_mode):
        raise KeyFileError(
            f"signing key {path} is readable by group/others (mode {st.st_mode & 0o777:o}): "
            f"run 'chmod 600 {path}'"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} is not an Ed25519 private key in PEM: make one with 'bootlink sign-key'"
        )
    return key


def parse_public_key(spec: str, where: str = "trusted key") -> bytes:
    """A trusted key from config: 64 hex digits, or a file holding hex or a PEM public key."""
    s = spec.strip()
    if _HEX64.fullmatch(s.lower()):
        return bytes.fromhex(s)
    path = Path(s).expanduser()
    try:
        data = path.read_bytes()
    except OSError:
        raise BootlinkError(
            f"{where} '{spec}' is neither 64 hex digits nor a readable file: "
            "use the hex that 'bootlink sign-key' printed"
        ) from None
    text = data.strip()
    if _HEX64.fullmatch(text.decode("ascii", "replace").lower()):
        return bytes.fromhex(text.decode())
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise BootlinkError(f"{where} file {path} holds no Ed25519 public key (hex or PEM)")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------- sign / verify


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Envelope:
    sig = key.sign(SIGNING_CONTEXT + manifest.canonical_bytes())
    return Envelope(manifest, (Signature(public_bytes(key), sig),))


def unsigned_envelope(manifest: Manifest) -> Envelope:
    return Envelope(manifest, ())


@dataclass(frozen=True)
class Verdict:
    manifest: Manifest
    key: bytes | None  # the trusted key that vouched, None when accepted unsigned

    def describe(self) -> str:
        if self.key is None:
            return "unsigned manifest, allowed by client.allow_unsigned"
        return f"ed25519 signature by trusted key {fingerprint(self.key)}"


def verify_envelope(
    env: Envelope, trusted: list[bytes], *, allow_unsigned: bool, where: str
) -> Verdict:
    """Accept the manifest only if a trusted key signed it (or the source may be unsigned).

    A bad signature by a *trusted* key is always fatal: someone altered the manifest.
    """
    message = SIGNING_CONTEXT + env.manifest.canonical_bytes()
    trusted_set = set(trusted)
    untrusted = []
    for s in env.signatures:
        if s.key not in trusted_set:
            untrusted.append(s.key)
            continue
        try:
            Ed25519PublicKey.from_public_bytes(s.key).verify(s.sig, message)
        except InvalidSignature:
            raise ManifestError(
                f"manifest from {where} carries a signature by trusted key {fingerprint(s.key)} "
                "that does not verify: the manifest was altered; do not boot it"
            ) from None
        return Verdict(env.manifest, s.key)
    if allow_unsigned:
        return Verdict(env.manifest, None)
    if untrusted:
        keys = ", ".join(fingerprint(k) for k in untrusted)
        raise ManifestError(
            f"manifest from {where} is signed only by untrusted key(s) {keys}: add the full "
            "public key to client.trusted_keys if you trust its publisher"
        )
    raise ManifestError(
        f"manifest from {where} is not signed: publish it with --sign-key, or list the "
        "source in client.allow_unsigned"
    )

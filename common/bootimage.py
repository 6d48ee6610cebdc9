"""One type for everything bootable, whatever source it came from (cf. u-root's boot.OSImage).

The laptop link, Swarm, IPFS and the web all yield `BootImage`s; the kexec module loads
any of them. `provenance` records *how* the bytes were verified, so the menu and the
logs can say it and nothing unverified is ever executed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Provenance:
    source: str  # "link", "swarm", "ipfs", "web", "iso"
    locator: str  # server address, swarm reference, CID, URL...
    verified_by: str  # human-readable: "AES-EAX sealed stream, key 3fa2c1", "ed25519 key ..."


@dataclass(frozen=True)
class BootImage:
    label: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    provenance: Provenance
    kernel_sha256: str = ""
    initrd_sha256: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # source-specific facts (nbd_uri...)

    def describe(self) -> str:
        return f"{self.label} [{self.provenance.source}: {self.provenance.verified_by}]"


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def check_digests(image: BootImage) -> None:
    """Hash the image's files and compare them with its verified digests.

    kexec does this on the very descriptors it loads; a dry run, which loads nothing,
    does it here so that the plan it prints never names digests no file has.
    """
    from .errors import BootlinkError

    for what, path, expected in (
        ("kernel", image.kernel, image.kernel_sha256),
        ("initrd", image.initrd, image.initrd_sha256),
    ):
        if path is None:
            continue
        if not expected:
            raise BootlinkError(f"{what} {path} has no verified digest: refusing to plan it")
        if sha256_file(path) != expected:
            raise BootlinkError(
                f"{what} {path} does not match its verified SHA-256: it changed after the "
                "download; run the client again"
            )

"""Web source: http(s) downloads verified by a SHA-256 pinned in the spec or a signed manifest.

TLS alone does not make a boot image trustworthy (a mirror can be compromised), so a web
spec must carry its hash, `https://host/file#sha256=HEX`, or point at a manifest signed
by a trusted key (the manifest then pins each file's SHA-256). The download goes to a
temporary name, is hashed on the fly, and is renamed only when the hash matches.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from bootlink.common.errors import BootlinkError, Interrupted, ProtocolError
from bootlink.common.log import Progress
from bootlink.common.output_file import OutputFile

from ._http import HttpClient, HttpError, TooLarge, error_text

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class WebSpec:
    url: str  # without the fragment
    sha256: str | None  # lowercase hex, from "#sha256=..."

    @classmethod
    def parse(cls, spec: str) -> WebSpec:
        url, _, frag = spec.partition("#")
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BootlinkError(f"'{spec}' is not an http(s) URL")
        return cls(url, sha256_from_fragment(frag, spec) if frag else None)

    def __str__(self) -> str:
        return self.url + (f"#sha256={self.sha256}" if self.sha256 else "")


def sha256_from_fragment(frag: str, spec: str) -> str:
    """The hex digest of a "sha256=HEX" spec fragment."""
    values = urllib.parse.parse_qs(frag.replace(";", "&")).get("sha256")
    if not values or not _HEX64.fullmatch(values[0]):
        raise BootlinkError(
            f"'{spec}': the fragment must be #sha256=<64 hex digits>, e.g. from sha256sum"
        )
    return values[0].lower()


class HashMismatch(ProtocolError):
    pass


__all__ = ["HashMismatch", "TooLarge", "WebFetch", "WebSpec", "fetch", "sha256_from_fragment"]


@dataclass(frozen=True)
class WebFetch:
    url: str
    size: int
    sha256: str


def _fix(status: int) -> str:
    if status in (401, 403):
        return "the server refuses access: check the URL or use another mirror"
    if status >= 500:
        return "the server failed: retry later or use another mirror"
    return "check the URL"


def fetch(
    url: str,
    output: Path,
    *,
    sha256: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    max_size: int = 1 << 36,
    label: str | None = None,
) -> WebFetch:
    """GET `url` into `output`; if `sha256` is given, refuse anything else."""
    u = urllib.parse.urlsplit(url)
    base = f"{u.scheme}://{u.netloc}"
    path = urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
    http = HttpClient(base, timeout, what="URL")
    for _ in range(5):  # follow a few redirects (mirrors redirect to the nearest host)
        try:
            resp = http.request("GET", path)
        except HttpError as exc:
            cls = Interrupted if isinstance(exc, Interrupted) else BootlinkError
            raise cls(f"download of {url}: {exc}") from None
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            resp.read()
            http.close()
            url = urllib.parse.urljoin(url, resp.getheader("Location"))
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https"):
                raise BootlinkError(f"{url}: redirect to a non-http URL refused")
            http = HttpClient(f"{u.scheme}://{u.netloc}", timeout, what="URL")
            path = urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
            continue
        break
    else:
        http.close()
        raise BootlinkError(f"download of {url}: more than 5 redirects; check the URL")
    if resp.status != 200:
        body = resp.read(4096)
        http.close()
        detail = error_text(body)
        detail = resp.reason if not detail or detail.startswith("(") else detail
        raise BootlinkError(f"download of {url}: HTTP {resp.status} {detail}; {_fix(resp.status)}")
    length = resp.getheader("Content-Length")
    total = int(length) if length and length.isdigit() else 0
    if total > max_size:
        http.close()
        raise TooLarge(f"{url} is {total} bytes, over the {max_size}-byte limit")
    prog = Progress(label or Path(u.path).name or url, total) if progress else None
    h = hashlib.sha256()
    size = 0
    try:
        with OutputFile(output, size=total or None) as out:
            while True:
                try:
                    block = resp.read1(1 << 20)
                except (OSError, ValueError) as exc:
                    raise Interrupted(
                        f"download of {url} broke after {size} bytes: {exc}"
                    ) from None
                if not block:
                    break
                size += len(block)
                if size > max_size:
                    raise TooLarge(f"{url} exceeds the {max_size}-byte limit")
                h.update(block)
                out.write(block)
                if prog:
                    prog.advance(len(block))
            if total and size != total:
                raise Interrupted(
                    f"download of {url} ended after {size} of {total} bytes: truncated; retry"
                )
            digest = h.hexdigest()
            if sha256 is not None and digest != sha256:
                raise HashMismatch(
                    f"{url} has sha256 {digest}, not the {sha256} the spec pins: the server "
                    "sent other bytes (tampered or a different version); do not boot it"
                )
            out.commit()
    finally:
        http.close()
    if prog:
        prog.finish()
    return WebFetch(url, size, digest)

"""Prove an NBD export is reachable and is the disk we were told about (libnbd)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from urllib.parse import quote

from .errors import BootlinkError

SECTOR = 512


@dataclass(frozen=True)
class NbdTarget:
    host: str  # may carry %scope for link-local
    port: int
    export: str

    @property
    def uri(self) -> str:
        """An nbd:// URI that libnbd's connect_uri accepts ('%' escaped as %25)."""
        host = self.host
        if ":" in host:
            host = "[" + quote(host, safe=":") + "]"
        return f"nbd://{host}:{self.port}/{quote(self.export)}"


def check_export(
    target: NbdTarget, expect_size: int, expect_first_sha256: str, timeout: float = 10.0
) -> None:
    """Connect, compare size and first sector's hash; retry briefly while nbdkit starts."""
    import nbd  # Debian's python3-libnbd; imported here so other commands don't need it

    deadline = time.monotonic() + timeout
    while True:
        h = nbd.NBD()
        try:
            h.set_export_name(target.export)
            h.connect_tcp(target.host, str(target.port))
            size = h.get_size()
            first = h.pread(min(SECTOR, size), 0)
            h.shutdown()
            break
        except nbd.Error as exc:
            if time.monotonic() >= deadline:
                raise BootlinkError(
                    f"NBD export {target.uri} unreachable ({exc.string}): check the cable; "
                    "the server admits only a client that just authenticated"
                ) from None
            time.sleep(0.2)
        finally:
            del h  # libnbd 1.14's Python handle has no close(); dropping it closes it
    if size != expect_size:
        raise BootlinkError(
            f"NBD export is {size} bytes, the server announced {expect_size}: not the same disk"
        )
    if hashlib.sha256(first).hexdigest() != expect_first_sha256:
        raise BootlinkError("NBD export's first sector differs from what the server announced")

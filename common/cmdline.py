"""Kernel command lines: what the client hands the laptop's kernel, and parsing.

The target's initrd hook (initramfs-tools or dracut) reads the bootlink.* keys to find the
NIC by MAC and attach the root disk over NBD to the server's link-local address.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NbdRoot:
    host: str  # server link-local address, no scope (the hook adds its own NIC name)
    port: int
    export: str
    if_mac: str
    read_only: bool = False

    def params(self) -> list[str]:
        out = [
            f"bootlink.nbd_host={self.host}",
            f"bootlink.nbd_port={self.port}",
            f"bootlink.nbd_export={self.export}",
            f"bootlink.if_mac={self.if_mac}",
        ]
        if self.read_only:
            out.append("bootlink.nbd_ro=1")
        return out


def strip_bootlink_keys(cmdline: str) -> list[str]:
    """Drop bootlink.* keys a served cmdline might carry: only the client sets them.

    Words are split on whitespace and kept verbatim (kernel quoting survives untouched).
    """
    return [w for w in cmdline.split() if not w.startswith("bootlink.")]


def target_cmdline(served: str, root: NbdRoot, append: str = "") -> str:
    words = strip_bootlink_keys(served) + root.params() + append.split()
    return " ".join(words)


def parse(cmdline: str) -> dict[str, str]:
    """key=value pairs of a command line (flags without '=' map to ''); last one wins."""
    out: dict[str, str] = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out

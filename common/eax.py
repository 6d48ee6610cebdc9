"""AES-EAX (Bellare, Rogaway, Wagner 2004) composed from the `cryptography` package.

`cryptography` has no EAX mode, but EAX is defined entirely in terms of AES-CTR and
OMAC (= CMAC), both of which it provides on top of OpenSSL:

    N' = OMAC_K(0 || nonce)    H' = OMAC_K(1 || header)
    C  = CTR_K(N', plaintext)  C' = OMAC_K(2 || C)
    tag = N' xor H' xor C'

The streaming classes let a multi-megabyte payload be sealed or opened in bounded
memory; `seal`/`open_` are the one-shot forms used for small messages;
`seal_many`/`open_many_in_place` take a batch of bulk frames under one key and run their
OMAC chains side by side (common/omac_lanes.py), which is what makes bulk EAX fast.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bootlink.common import omac_lanes

BLOCK = 16
TAG_SIZE = 16


class InvalidTag(Exception):
    """The tag did not verify: the message was forged, altered, or sealed under another key."""


def _omac(key: bytes, tweak: int, data: bytes = b"") -> cmac.CMAC:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(bytes(BLOCK - 1) + bytes([tweak]))
    if data:
        mac.update(data)
    return mac


def _dbl(block: bytes) -> bytes:
    """Doubling in GF(2^128), as CMAC derives its sub-keys (RFC 4493)."""
    n = int.from_bytes(block, "big") << 1
    if n >> 128:
        n = (n & ((1 << 128) - 1)) ^ 0x87
    return n.to_bytes(BLOCK, "big")


_scratch = threading.local()  # per-thread CBC output buffer: reused, never read as data


def _omac_bulk(key: bytes, tweak: int, data: memoryview) -> bytes:
    """OMAC_K(tweak || data) for a long, non-empty message (see `_omac_bulk_many`)."""
    return _omac_bulk_many(key, tweak, [data])[0]


def _omac_bulk_many(key: bytes, tweak: int, messages: Sequence[memoryview]) -> list[bytes]:
    """OMAC_K(tweak || m) for each of several long, non-empty messages.

    Same values as `_omac(...).finalize()` (tests check it). CMAC is CBC-MAC whose last
    block is xored with sub-key K1 (complete) or K2 (padded with 10*); the chains run
    through omac_lanes (several messages interleaved on AES-NI) when it can, else
    through an AES-CBC `Cipher` context, which, unlike `CMAC.update` of
    cryptography >= 40, releases the GIL, so worker threads MAC on all cores at once.
    """
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    k1 = _dbl(ecb.update(bytes(BLOCK)))
    k2 = _dbl(k1)
    start = ecb.update(bytes(BLOCK - 1) + bytes([tweak]))  # CBC state after the tweak block
    bodies, lasts = [], []
    for data in messages:
        rest = len(data) % BLOCK or BLOCK
        bodies.append(data[: len(data) - rest])
        last = bytes(data[len(data) - rest :])
        lasts.append(_xor(last, k1) if rest == BLOCK else _xor(_pad(last), k2))
    chains = omac_lanes.chain(key, start, bodies)
    if chains is None:
        chains = [_cbc_chain(key, start, body) for body in bodies]
    return [ecb.update(_xor(c, last)) for c, last in zip(chains, lasts, strict=True)]


def _pad(partial: bytes) -> bytes:
    return partial + b"\x80" + bytes(BLOCK - len(partial) - 1)


def _cbc_chain(key: bytes, start: bytes, body: memoryview) -> bytes:
    """The CBC-MAC state after `body` (whole blocks), through OpenSSL."""
    if not body:
        return start
    out = getattr(_scratch, "buf", None)
    if out is None or len(out) < len(body) + BLOCK:
        out = _scratch.buf = bytearray(len(body) + BLOCK)
    n = Cipher(algorithms.AES(key), modes.CBC(start)).encryptor().update_into(body, out)
    return bytes(out[n - BLOCK : n])


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _check_key(key: bytes) -> None:
    if len(key) not in (16, 24, 32):
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")


class _Stream:
    def __init__(self, key: bytes, nonce: bytes, header: bytes) -> None:
        _check_key(key)
        n = _omac(key, 0, nonce).finalize()
        self._prefix = _xor(n, _omac(key, 1, header).finalize())
        self._ctr = Cipher(algorithms.AES(key), modes.CTR(n))
        self._mac = _omac(key, 2)


class Encryptor(_Stream):
    """Streaming EAX encryption: `update()` any number of times, then `finalize()` -> tag."""

    def __init__(self, key: bytes, nonce: bytes, header: bytes = b"") -> None:
        super().__init__(key, nonce, header)
        self._enc = self._ctr.encryptor()

    def update(self, plaintext: bytes) -> bytes:
        ciphertext = self._enc.update(plaintext)
        self._mac.update(ciphertext)
        return ciphertext

    def finalize(self) -> bytes:
        self._enc.finalize()
        return _xor(self._prefix, self._mac.finalize())


def _bytes(data) -> bytes:
    # cryptography < 40 (Debian bookworm's 38, which the ramdisk runs) takes only bytes in
    # CMAC.update; newer versions take any buffer. Copying a small message costs far less
    # than the MAC itself (bulk frames go through open_in_place, which copies nothing).
    return data if isinstance(data, bytes) else bytes(data)


class Decryptor(_Stream):
    """Streaming EAX decryption.

    Plaintext returned by `update()` is NOT authentic until `verify(tag)` succeeds: callers
    must write it somewhere provisional and discard it if verification fails.
    """

    def __init__(self, key: bytes, nonce: bytes, header: bytes = b"") -> None:
        super().__init__(key, nonce, header)
        self._dec = self._ctr.decryptor()

    def update(self, ciphertext: bytes) -> bytes:
        ciphertext = _bytes(ciphertext)
        self._mac.update(ciphertext)
        return self._dec.update(ciphertext)

    def verify(self, tag: bytes) -> None:
        self._dec.finalize()
        expected = _xor(self._prefix, self._mac.finalize())
        if not hmac.compare_digest(expected, tag):
            raise InvalidTag("EAX tag mismatch")


@dataclass(frozen=True)
class Sealed:
    """One EAX message to open in place: `sealed` (ciphertext || tag) must be writable."""

    nonce: bytes
    sealed: memoryview
    header: bytes = b""


def open_in_place(key: bytes, nonce: bytes, sealed: memoryview, header: bytes = b"") -> memoryview:
    """Verify ciphertext || tag in `sealed` (a writable buffer), then decrypt it in place.

    Returns the plaintext as a view of `sealed`'s first bytes. Nothing is decrypted
    unless the tag verifies, and no buffer is allocated: a 1 MiB frame is MACed and
    decrypted where it was received (fresh megabyte allocations cost page faults that
    show up as a third of the time of opening a frame).
    """
    plain = open_many_in_place(key, [Sealed(nonce, sealed, header)])[0]
    if plain is None:
        raise InvalidTag("EAX tag mismatch")
    return plain


def open_many_in_place(key: bytes, messages: Sequence[Sealed]) -> list[memoryview | None]:
    """`open_in_place` for several messages under one key: their MAC chains run side by
    side (omac_lanes), which is what makes bulk EAX fast. Each result is the plaintext
    view, or None where the tag did not verify (that message is left undecrypted)."""
    _check_key(key)
    for m in messages:
        if len(m.sealed) < TAG_SIZE:
            raise InvalidTag("sealed message shorter than its tag")
    bodies = [m.sealed[:-TAG_SIZE] for m in messages]
    out: list[memoryview | None] = []
    for m, body, mac in zip(messages, bodies, _omac_ciphertexts(key, bodies), strict=True):
        n, prefix = _nonce_and_prefix(key, m.nonce, m.header)
        if not hmac.compare_digest(_xor(prefix, mac), bytes(m.sealed[-TAG_SIZE:])):
            out.append(None)
            continue
        # CTR in place: the output may be the input (cryptography wants room for one
        # block more than the input, which the tag's bytes provide)
        Cipher(algorithms.AES(key), modes.CTR(n)).decryptor().update_into(body, m.sealed)
        out.append(body)
    return out


def seal(key: bytes, nonce: bytes, plaintext: bytes, header: bytes = b"") -> bytes:
    """Encrypt and authenticate: returns ciphertext || 16-byte tag."""
    enc = Encryptor(key, nonce, header)
    return enc.update(plaintext) + enc.finalize()


def seal_many(key: bytes, messages: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytearray]:
    """`seal` for several (nonce, plaintext, header) under one key, their MAC chains run
    side by side (see `open_many_in_place`): returns each ciphertext || tag."""
    _check_key(key)
    out, prefixes = [], []
    for nonce, plaintext, header in messages:
        n, prefix = _nonce_and_prefix(key, nonce, header)
        prefixes.append(prefix)
        sealed = bytearray(len(plaintext) + TAG_SIZE)  # CTR wants a block of slack: the tag's
        Cipher(algorithms.AES(key), modes.CTR(n)).encryptor().update_into(plaintext, sealed)
        out.append(sealed)
    macs = _omac_ciphertexts(key, [memoryview(s)[:-TAG_SIZE] for s in out])
    for sealed, prefix, mac in zip(out, prefixes, macs, strict=True):
        sealed[-TAG_SIZE:] = _xor(prefix, mac)
    return out


def _nonce_and_prefix(key: bytes, nonce: bytes, header: bytes) -> tuple[bytes, bytes]:
    """EAX's N' (the CTR start) and N' xor H' (the tag without the ciphertext's MAC)."""
    n = _omac(key, 0, nonce).finalize()
    return n, _xor(n, _omac(key, 1, header).finalize())


def _omac_ciphertexts(key: bytes, bodies: Sequence[memoryview]) -> list[bytes]:
    """C' = OMAC_K(2 || c) for each ciphertext, the long ones side by side."""
    long = [i for i, body in enumerate(bodies) if body]
    macs = dict(zip(long, _omac_bulk_many(key, 2, [bodies[i] for i in long]), strict=True))
    if len(long) < len(bodies):
        empty = _omac(key, 2).finalize()
        return [macs.get(i, empty) for i in range(len(bodies))]
    return [macs[i] for i in range(len(bodies))]


def open_(key: bytes, nonce: bytes, sealed: bytes, header: bytes = b"") -> bytes:
    """Verify and decrypt ciphertext || tag; raises InvalidTag on any change."""
    if len(sealed) < TAG_SIZE:
        raise InvalidTag("sealed message shorter than its tag")
    dec = Decryptor(key, nonce, header)
    plaintext = dec.update(sealed[:-TAG_SIZE])
    dec.verify(bytes(sealed[-TAG_SIZE:]))
    return plaintext

"""AES-EAX (Bellare, Rogaway, Wagner 2004) composed from the `cryptography` package.

`cryptography` has no EAX mode, but EAX is defined entirely in terms of AES-CTR and
OMAC (= CMAC), both of which it provides on top of OpenSSL:

    N' = OMAC_K(0 || nonce)    H' = OMAC_K(1 || header)
    C  = CTR_K(N', plaintext)  C' = OMAC_K(2 || C)
    tag = N' xor H' xor C'

The streaming classes let a multi-megabyte payload be sealed or opened in bounded
memory; `seal`/`open_` are the one-shot forms used for small messages.
"""

from __future__ import annotations

import hmac
import threading

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

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
    """OMAC_K(tweak || data) for a long, non-empty message, through AES-CBC.

    Same value as `_omac(...).finalize()` (tests check it), but the CBC chain runs in a
    `Cipher` context, which releases the GIL, where `CMAC.update` of cryptography >= 40
    holds it: worker threads then MAC frames on all cores at once. CMAC is CBC-MAC whose
    last block is xored with sub-key K1 (complete) or K2 (padded with 10*).
    """
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    k1 = _dbl(ecb.update(bytes(BLOCK)))
    chain = ecb.update(bytes(BLOCK - 1) + bytes([tweak]))  # CBC state after the tweak block
    rest = len(data) % BLOCK or BLOCK
    body, last = data[: len(data) - rest], bytes(data[len(data) - rest :])
    if rest == BLOCK:
        last = _xor(last, k1)
    else:
        last = _xor(last + b"\x80" + bytes(BLOCK - rest - 1), _dbl(k1))
    if body:
        out = getattr(_scratch, "buf", None)
        if out is None or len(out) < len(body) + BLOCK:
            out = _scratch.buf = bytearray(len(body) + BLOCK)
        cbc = Cipher(algorithms.AES(key), modes.CBC(chain)).encryptor()
        n = cbc.update_into(body, out)
        chain = bytes(out[n - BLOCK : n])
    return ecb.update(_xor(chain, last))


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


def open_in_place(key: bytes, nonce: bytes, sealed: memoryview, header: bytes = b"") -> memoryview:
    """Verify ciphertext || tag in `sealed` (a writable buffer), then decrypt it in place.

    Returns the plaintext as a view of `sealed`'s first bytes. Nothing is decrypted
    unless the tag verifies, and no buffer is allocated: a 1 MiB frame is MACed and
    decrypted where it was received (fresh megabyte allocations cost page faults that
    show up as a third of the time of opening a frame).
    """
    _check_key(key)
    if len(sealed) < TAG_SIZE:
        raise InvalidTag("sealed message shorter than its tag")
    body, tag = sealed[:-TAG_SIZE], bytes(sealed[-TAG_SIZE:])
    n = _omac(key, 0, nonce).finalize()
    c = _omac_bulk(key, 2, body) if body else _omac(key, 2).finalize()
    expected = _xor(_xor(n, _omac(key, 1, header).finalize()), c)
    if not hmac.compare_digest(expected, tag):
        raise InvalidTag("EAX tag mismatch")
    # CTR in place: the output may be the input (cryptography wants room for one block
    # more than the input, which the tag's bytes provide)
    Cipher(algorithms.AES(key), modes.CTR(n)).decryptor().update_into(body, sealed)
    return body


def seal(key: bytes, nonce: bytes, plaintext: bytes, header: bytes = b"") -> bytes:
    """Encrypt and authenticate: returns ciphertext || 16-byte tag."""
    enc = Encryptor(key, nonce, header)
    return enc.update(plaintext) + enc.finalize()


def open_(key: bytes, nonce: bytes, sealed: bytes, header: bytes = b"") -> bytes:
    """Verify and decrypt ciphertext || tag; raises InvalidTag on any change."""
    if len(sealed) < TAG_SIZE:
        raise InvalidTag("sealed message shorter than its tag")
    dec = Decryptor(key, nonce, header)
    plaintext = dec.update(sealed[:-TAG_SIZE])
    dec.verify(bytes(sealed[-TAG_SIZE:]))
    return plaintext

"""IPFS content addressing, offline: CIDs, multihash, dag-pb/UnixFS and CAR v1.

Everything a client needs to verify what a trustless gateway sends, and everything a
publisher needs to know a file's CID before uploading it:

- CIDv0 (base58btc "Qm...", always dag-pb + sha2-256) and CIDv1 (multibase base32 "b..."
  or base58btc "z..."), multihash sha2-256 and identity;
- a minimal protobuf codec for dag-pb (PBNode/PBLink) and the UnixFS `Data` message;
- the balanced UnixFS file importer in three layouts: kubo-v0 (256 KiB chunks, 174 links,
  dag-pb leaves, CIDv0), kubo-v1 (same with raw leaves and CIDv1) and v1-2025 (IPIP-499
  "unixfs-v1-2025": 1 MiB chunks, 1024 links, raw leaves, CIDv1);
- a streaming CAR v1 reader (the header is minimal dag-cbor; its roots are parsed but
  callers must ignore them, as the trustless-gateway spec says) and writer.

Parsers raise `IpfsFormatError` (a ValueError) on any malformed input; they never trust
lengths beyond the bytes actually present.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# Multicodec codes we handle.
DAG_PB = 0x70
RAW = 0x55
SHA2_256 = 0x12
IDENTITY = 0x00
MAX_BLOCK = 2 * 1024 * 1024  # trustless clients refuse blocks over 2 MiB (bitswap's limit)


class IpfsFormatError(ValueError):
    """Malformed CID, protobuf, dag-pb, UnixFS or CAR data."""


# ---------------------------------------------------------------- varints, bases


def encode_varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int = 0) -> tuple[int, int]:
    """(value, next position); at most 9 bytes (63 bits), minimal encoding required."""
    value = shift = 0
    for i in range(pos, min(pos + 9, len(buf))):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i != pos:
                raise IpfsFormatError("non-minimal varint")
            return value, i + 1
        shift += 7
    if len(buf) - pos >= 9:
        raise IpfsFormatError("varint longer than 9 bytes")
    raise IpfsFormatError("truncated varint")


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_INDEX = {c: i for i, c in enumerate(_B32)}


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise IpfsFormatError(f"'{c}' is not a base58btc character")
        n = n * 58 + _B58_INDEX[c]
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def b32encode(data: bytes) -> str:
    """RFC 4648 base32, lowercase, no padding (multibase 'b')."""
    bits = len(data) * 8
    n = int.from_bytes(data, "big") << (-bits % 5)
    chars = -(-bits // 5)
    return "".join(_B32[(n >> (5 * (chars - 1 - i))) & 31] for i in range(chars))


def b32decode(text: str) -> bytes:
    n = 0
    for c in text.lower():
        if c not in _B32_INDEX:
            raise IpfsFormatError(f"'{c}' is not a base32 character")
        n = (n << 5) | _B32_INDEX[c]
    nbytes = len(text) * 5 // 8
    pad = len(text) * 5 - nbytes * 8
    if n & ((1 << pad) - 1):
        raise IpfsFormatError("non-zero padding bits in base32")
    return (n >> pad).to_bytes(nbytes, "big")


# ---------------------------------------------------------------- multihash, CID


@dataclass(frozen=True)
class CID:
    version: int
    codec: int
    mh_code: int
    digest: bytes

    @functools.cached_property  # the key of every block lookup: computed once per CID
    def multihash(self) -> bytes:
        return encode_varint(self.mh_code) + encode_varint(len(self.digest)) + self.digest

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def __str__(self) -> str:
        if self.version == 0:
            return b58encode(self.multihash)
        return "b" + b32encode(self.to_bytes())

    def short(self) -> str:
        s = str(self)
        return s if len(s) <= 20 else f"{s[:10]}…{s[-6:]}"

    def verify(self, block: bytes) -> bool:
        """Does `block` hash to this CID?"""
        if self.mh_code == SHA2_256:
            return hashlib.sha256(block).digest() == self.digest
        if self.mh_code == IDENTITY:
            return block == self.digest
        return False

    @classmethod
    def for_block(cls, block: bytes, codec: int, version: int) -> CID:
        if version == 0 and codec != DAG_PB:
            raise ValueError("CIDv0 is always dag-pb")
        return cls(version, codec, SHA2_256, hashlib.sha256(block).digest())

    @classmethod
    def parse(cls, text: str) -> CID:
        """A CID from its string form (v0 base58btc, v1 base32 'b' or base58btc 'z')."""
        t = text.strip()
        fix = "copy it as 'bootlink publish' or 'bootlink ref ipfs FILE' printed it"
        if len(t) == 46 and t.startswith("Qm"):
            raw = t
        elif t[:1] in ("b", "B", "z") and len(t) > 1:
            raw = t[1:]
        else:
            raise IpfsFormatError(
                f"{text!r} is not a CID: expected Qm... (v0), b... (base32) or z... (base58); {fix}"
            )
        try:
            cid, end = cls.decode(b32decode(raw) if t[0] in "bB" else b58decode(raw))
        except ValueError as exc:  # (IpfsFormatError too: a truncated or odd CID)
            raise IpfsFormatError(f"{text!r} is not a CID ({exc}): {fix}") from None
        if end != len(cid.to_bytes()) or (cid.version == 0) != t.startswith("Qm"):
            raise IpfsFormatError(f"{text!r} is not a canonical CID: {fix}")
        return cid

    @classmethod
    def decode(cls, buf: bytes | memoryview, pos: int = 0) -> tuple[CID, int]:
        """A binary CID at `pos`; returns it and the position after it."""
        have = len(buf) - pos
        if have >= 2 and buf[pos] == SHA2_256 and buf[pos + 1] == 32:
            if have < 34:
                raise IpfsFormatError("truncated CIDv0")
            return cls(0, DAG_PB, SHA2_256, bytes(buf[pos + 2 : pos + 34])), pos + 34
        if (
            have >= 36
            and buf[pos] == 1
            and buf[pos + 1] < 0x80
            and buf[pos + 2] == SHA2_256
            and buf[pos + 3] == 32
        ):  # the common CIDv1 (one-byte codec, sha2-256): no varint loops, same result
            return cls(1, buf[pos + 1], SHA2_256, bytes(buf[pos + 4 : pos + 36])), pos + 36
        version, p = decode_varint(buf, pos)
        if version != 1:
            raise IpfsFormatError(f"unsupported CID version {version}")
        codec, p = decode_varint(buf, p)
        mh_code, p = decode_varint(buf, p)
        length, p = decode_varint(buf, p)
        if mh_code == SHA2_256 and length != 32:
            raise IpfsFormatError("sha2-256 multihash must be 32 bytes")
        if mh_code not in (SHA2_256, IDENTITY):
            raise IpfsFormatError(f"unsupported multihash 0x{mh_code:x} (only sha2-256)")
        if length > MAX_BLOCK or p + length > len(buf):
            raise IpfsFormatError("truncated multihash")
        return cls(1, codec, mh_code, bytes(buf[p : p + length])), p + length


# ---------------------------------------------------------------- protobuf


def pb_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field; bytes values as memoryviews."""
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        key, pos = decode_varint(view, pos)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise IpfsFormatError("protobuf field number 0")
        if wire == 0:
            value, pos = decode_varint(view, pos)
            yield num, wire, value
        elif wire == 2:
            length, pos = decode_varint(view, pos)
            if pos + length > len(view):
                raise IpfsFormatError("truncated protobuf bytes field")
            yield num, wire, view[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(view):
                raise IpfsFormatError("truncated protobuf fixed field")
            yield num, wire, int.from_bytes(view[pos : pos + size], "little")
            pos += size
        else:
            raise IpfsFormatError(f"unsupported protobuf wire type {wire}")


def pb_key(num: int, wire: int) -> bytes:
    return encode_varint(num << 3 | wire)


def pb_bytes(num: int, data: bytes) -> bytes:
    return pb_key(num, 2) + encode_varint(len(data)) + data


def pb_varint(num: int, value: int) -> bytes:
    return pb_key(num, 0) + encode_varint(value)


# ---------------------------------------------------------------- dag-pb


@dataclass(frozen=True)
class PBLink:
    cid: CID
    name: str | None
    tsize: int | None


@dataclass(frozen=True)
class PBNode:
    links: tuple[PBLink, ...]
    data: bytes | None

    def encode(self) -> bytes:
        # dag-pb's canonical form: all Links (field 2) first, then Data (field 1).
        out = bytearray()
        for link in self.links:
            body = pb_bytes(1, link.cid.to_bytes())
            if link.name is not None:
                body += pb_bytes(2, link.name.encode())
            if link.tsize is not None:
                body += pb_varint(3, link.tsize)
            out += pb_bytes(2, body)
        if self.data is not None:
            out += pb_bytes(1, self.data)
        return bytes(out)

    @classmethod
    def decode(cls, block: bytes | memoryview) -> PBNode:
        links, data = _pb_node_fields(block)
        return cls(tuple(links), None if data is None else bytes(data))


def _pb_node_fields(block: bytes | memoryview) -> tuple[list[PBLink], memoryview | None]:
    """dag-pb Links and Data, the Data as a view into `block` (no copy)."""
    links: list[PBLink] = []
    data = None
    for num, wire, value in pb_fields(block):
        if num == 2 and wire == 2:
            if data is not None:
                raise IpfsFormatError("dag-pb Links after Data")
            links.append(_decode_link(value))  # type: ignore[arg-type]
        elif num == 1 and wire == 2:
            if data is not None:
                raise IpfsFormatError("dag-pb Data twice")
            data = value
        else:
            raise IpfsFormatError(f"unexpected dag-pb field {num} (wire type {wire})")
    return links, data  # type: ignore[return-value]


def _decode_link(buf: memoryview) -> PBLink:
    cid = name = tsize = None
    last = 0
    for num, wire, value in pb_fields(buf):
        if num <= last:
            raise IpfsFormatError("dag-pb link fields out of order or repeated")
        last = num
        if num == 1 and wire == 2:
            c, end = CID.decode(value)  # type: ignore[arg-type]
            if end != len(value):  # type: ignore[arg-type]
                raise IpfsFormatError("trailing bytes after link CID")
            cid = c
        elif num == 2 and wire == 2:
            try:
                name = bytes(value).decode()  # type: ignore[arg-type]
            except UnicodeDecodeError:
                raise IpfsFormatError("dag-pb link name is not UTF-8") from None
        elif num == 3 and wire == 0:
            tsize = value
        else:
            raise IpfsFormatError(f"unexpected dag-pb link field {num} (wire type {wire})")
    if cid is None:
        raise IpfsFormatError("dag-pb link without Hash")
    return PBLink(cid, name, tsize)  # type: ignore[arg-type]


# ---------------------------------------------------------------- UnixFS

UNIXFS_RAW, UNIXFS_DIRECTORY, UNIXFS_FILE = 0, 1, 2


@dataclass(frozen=True)
class UnixFSData:
    type: int
    data: bytes = b""
    filesize: int | None = None
    blocksizes: tuple[int, ...] = ()

    def encode(self) -> bytes:
        out = pb_varint(1, self.type)
        if self.data:
            out += pb_bytes(2, self.data)
        if self.filesize is not None:
            out += pb_varint(3, self.filesize)
        for size in self.blocksizes:  # proto2 repeated, not packed (as go and js write)
            out += pb_varint(4, size)
        return out

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> UnixFSData:
        type_, data, filesize, sizes = _unixfs_fields(buf)
        return cls(type_, bytes(data), filesize, sizes)


def _unixfs_fields(
    buf: bytes | memoryview,
) -> tuple[int, memoryview, int | None, tuple[int, ...]]:
    """UnixFS Data's (type, data, filesize, blocksizes); data is a view into `buf`."""
    type_ = None
    data = memoryview(b"")
    filesize = None
    sizes: list[int] = []
    for num, wire, value in pb_fields(buf):
        if num == 1 and wire == 0:
            type_ = value
        elif num == 2 and wire == 2:
            data = value  # type: ignore[assignment]
        elif num == 3 and wire == 0:
            filesize = value
        elif num == 4 and wire == 0:
            sizes.append(value)  # type: ignore[arg-type]
        elif num == 4 and wire == 2:  # packed encoding is legal protobuf too
            p, packed = 0, value
            while p < len(packed):  # type: ignore[arg-type]
                v, p = decode_varint(packed, p)  # type: ignore[arg-type]
                sizes.append(v)
        elif (num in (5, 6, 7) and wire == 0) or (num == 8 and wire == 2):
            pass  # hashType, fanout, mode, mtime: metadata a file read ignores
        else:
            raise IpfsFormatError(f"unexpected UnixFS field {num} (wire type {wire})")
    if type_ is None:
        raise IpfsFormatError("UnixFS Data without Type")
    return type_, data, filesize, tuple(sizes)  # type: ignore[return-value]


@dataclass(frozen=True)
class FileNode:
    """A dag-pb UnixFS node as a file read needs it; `data` is a view into the block.

    Decoding a leaf this way copies none of its (up to 1 MiB of) file data.
    """

    links: tuple[CID, ...]
    type: int
    data: memoryview
    filesize: int | None
    blocksizes: tuple[int, ...]


def decode_file_node(block: bytes | memoryview) -> FileNode:
    links, data = _pb_node_fields(block)
    type_, udata, filesize, sizes = _unixfs_fields(data if data is not None else b"")
    return FileNode(tuple(link.cid for link in links), type_, udata, filesize, sizes)


# ---------------------------------------------------------------- importer


@dataclass(frozen=True)
class Layout:
    name: str
    chunk_size: int
    max_links: int
    raw_leaves: bool
    cid_version: int

    def add_params(self) -> dict[str, str]:
        """kubo /api/v0/add query parameters that produce this layout."""
        return {
            "cid-version": str(self.cid_version),
            "raw-leaves": "true" if self.raw_leaves else "false",
            "chunker": f"size-{self.chunk_size}",
            "trickle": "false",
            "hash": "sha2-256",
            **({"max-file-links": str(self.max_links)} if self.max_links != 174 else {}),
        }


LAYOUTS = {
    "kubo-v0": Layout("kubo-v0", 256 * 1024, 174, False, 0),
    "kubo-v1": Layout("kubo-v1", 256 * 1024, 174, True, 1),
    "v1-2025": Layout("v1-2025", 1024 * 1024, 1024, True, 1),
}
DEFAULT_LAYOUT = "kubo-v0"

BlockSink = Callable[[CID, bytes], None]


@dataclass
class _Entry:
    cid: CID
    filesize: int  # file bytes below
    tsize: int  # encoded bytes below, the block included (dag-pb Tsize)


@dataclass
class Importer:
    """Balanced UnixFS file DAG, streamed: feed bytes, get the root CID.

    Matches kubo's balanced builder: leaves all at one depth, every inner node filled
    to `max_links` left to right; a file of one chunk is that chunk alone.
    """

    layout: Layout
    sink: BlockSink | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _levels: list[list[_Entry]] = field(default_factory=lambda: [[]])
    _total: int = 0
    root_tsize: int = 0

    def update(self, data: bytes) -> None:
        self._total += len(data)
        self._buf += data
        cs = self.layout.chunk_size
        if len(self._buf) > cs:
            n = (len(self._buf) - 1) // cs * cs  # keep the last chunk for finish()
            view = memoryview(self._buf)
            for off in range(0, n, cs):
                self._leaf(bytes(view[off : off + cs]))
            view.release()
            del self._buf[:n]

    def _emit(self, block: bytes, codec: int) -> CID:
        cid = CID.for_block(block, codec, self.layout.cid_version)
        if self.sink:
            self.sink(cid, block)
        return cid

    def _leaf(self, chunk: bytes) -> None:
        if self.layout.raw_leaves:
            cid = self._emit(chunk, RAW)
            entry = _Entry(cid, len(chunk), len(chunk))
        else:
            unixfs = UnixFSData(UNIXFS_FILE, chunk, len(chunk)).encode()
            block = PBNode((), unixfs).encode()
            entry = _Entry(self._emit(block, DAG_PB), len(chunk), len(block))
        self._push(0, entry)

    def _push(self, level: int, entry: _Entry) -> None:
        while len(self._levels) <= level:
            self._levels.append([])
        self._levels[level].append(entry)
        if len(self._levels[level]) == self.layout.max_links:
            self._wrap(level)

    def _wrap(self, level: int) -> None:
        children = self._levels[level]
        self._levels[level] = []
        unixfs = UnixFSData(
            UNIXFS_FILE,
            filesize=sum(c.filesize for c in children),
            blocksizes=tuple(c.filesize for c in children),
        ).encode()
        links = tuple(PBLink(c.cid, "", c.tsize) for c in children)
        block = PBNode(links, unixfs).encode()
        cid = self._emit(block, DAG_PB)
        filesize = sum(c.filesize for c in children)
        entry = _Entry(cid, filesize, len(block) + sum(c.tsize for c in children))
        self._push(level + 1, entry)

    def finish(self) -> CID:
        if self._buf or self._total == 0:
            self._leaf(bytes(self._buf))
            self._buf.clear()
        level = 0
        while True:
            entries = self._levels[level]
            higher = any(self._levels[i] for i in range(level + 1, len(self._levels)))
            if not higher and len(entries) == 1:
                self.root_tsize = entries[0].tsize  # kubo's "Size" in /api/v0/add output
                return entries[0].cid
            if entries:
                # Unlike Swarm, a lone trailing child is wrapped in a node of its own:
                # kubo's balanced builder keeps every leaf at the same depth.
                self._wrap(level)
            level += 1

    @property
    def size(self) -> int:
        return self._total


def cid_of_bytes(data: bytes, layout: str = DEFAULT_LAYOUT, sink: BlockSink | None = None) -> CID:
    imp = Importer(LAYOUTS[layout], sink)
    imp.update(data)
    return imp.finish()


def cid_of_file(
    path: Path, layout: str = DEFAULT_LAYOUT, sink: BlockSink | None = None, progress=None
) -> CID:
    imp = Importer(LAYOUTS[layout], sink)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            imp.update(block)
            if progress is not None:
                progress.advance(len(block))
    return imp.finish()


# ---------------------------------------------------------------- dag-cbor (CAR header)


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def _cbor_text(s: str) -> bytes:
    b = s.encode()
    return _cbor_head(3, len(b)) + b


def encode_car_header(roots: list[CID]) -> bytes:
    """dag-cbor {"roots": [...], "version": 1} (keys sorted length-first, as dag-cbor)."""
    body = _cbor_head(5, 2) + _cbor_text("roots") + _cbor_head(4, len(roots))
    for root in roots:
        raw = b"\0" + root.to_bytes()  # tag 42: CID bytes behind the 0x00 multibase prefix
        body += b"\xd8\x2a" + _cbor_head(2, len(raw)) + raw
    body += _cbor_text("version") + _cbor_head(0, 1)
    return encode_varint(len(body)) + body


class _Cbor:
    """Just enough CBOR for a CAR header: ints, strings, arrays, maps, tag 42."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos, self.depth = buf, 0, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise IpfsFormatError("truncated CBOR in CAR header")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _arg(self, info: int) -> int:
        if info < 24:
            return info
        if info in (24, 25, 26, 27):
            return int.from_bytes(self._take(1 << (info - 24)), "big")
        raise IpfsFormatError("indefinite or reserved CBOR length in CAR header")

    def item(self):
        self.depth += 1
        if self.depth > 16:
            raise IpfsFormatError("CBOR nested too deeply in CAR header")
        head = self._take(1)[0]
        major, info = head >> 5, head & 31
        try:
            if major == 0:
                return self._arg(info)
            if major in (2, 3):
                n = self._arg(info)
                if n > len(self.buf):
                    raise IpfsFormatError("CBOR string longer than the CAR header")
                raw = self._take(n)
                if major == 2:
                    return raw
                try:
                    return raw.decode()
                except UnicodeDecodeError:
                    raise IpfsFormatError("CAR header text is not UTF-8") from None
            if major == 4:
                n = self._arg(info)
                if n > len(self.buf):
                    raise IpfsFormatError("CBOR array longer than the CAR header")
                return [self.item() for _ in range(n)]
            if major == 5:
                n = self._arg(info)
                if n > len(self.buf):
                    raise IpfsFormatError("CBOR map longer than the CAR header")
                out = {}
                for _ in range(n):
                    k = self.item()
                    if not isinstance(k, str):
                        raise IpfsFormatError("CAR header map key is not a string")
                    out[k] = self.item()
                return out
            if major == 6 and self._arg(info) == 42:
                raw = self.item()
                if not isinstance(raw, bytes) or raw[:1] != b"\0":
                    raise IpfsFormatError("CBOR tag 42 is not a CID")
                cid, end = CID.decode(raw, 1)
                if end != len(raw):
                    raise IpfsFormatError("trailing bytes in CBOR CID")
                return cid
            raise IpfsFormatError(f"unsupported CBOR item (major type {major}) in CAR header")
        finally:
            self.depth -= 1


def decode_car_header(body: bytes) -> dict:
    dec = _Cbor(body)
    header = dec.item()
    if dec.pos != len(body):
        raise IpfsFormatError("trailing bytes after CAR header")
    if not isinstance(header, dict) or header.get("version") != 1:
        raise IpfsFormatError("not a CAR v1 header (version must be 1)")
    roots = header.get("roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, CID) for r in roots):
        raise IpfsFormatError("CAR header roots is not a list of CIDs")
    return header


class CarTruncated(IpfsFormatError):
    """The CAR stream ended inside the header or a block section."""


class CarReader:
    """Streaming CAR v1 reader over a binary file-like object.

    Yields (CID, block) pairs as they come, *unverified*: the caller checks each block
    against its CID. Sections over `max_block` bytes are refused before they are read,
    so a hostile stream cannot make us buffer a huge block.
    """

    def __init__(self, stream: BinaryIO, max_block: int = MAX_BLOCK) -> None:
        self.stream = stream
        self.max_block = max_block
        self.bytes_read = 0
        length = self._varint(allow_eof=False)
        if length > 64 * 1024:
            raise IpfsFormatError(f"CAR header of {length} bytes is implausibly large")
        self.header = decode_car_header(self._read(length))

    def _read(self, n: int) -> bytes:
        parts = []
        want = n
        while want:
            part = self.stream.read(want)
            if not part:
                raise CarTruncated(f"CAR stream ended {want} bytes short inside a section")
            parts.append(part)
            want -= len(part)
        self.bytes_read += n
        return b"".join(parts)

    def _varint(self, allow_eof: bool) -> int | None:
        raw = bytearray()
        while True:
            b = self.stream.read(1)
            if not b:
                if not raw and allow_eof:
                    return None
                raise CarTruncated("CAR stream ended inside a length prefix")
            raw += b
            self.bytes_read += 1
            if not b[0] & 0x80:
                return decode_varint(raw)[0]
            if len(raw) >= 9:
                raise IpfsFormatError("CAR section length varint too long")

    def __iter__(self) -> Iterator[tuple[CID, bytes]]:
        while True:
            length = self._varint(allow_eof=True)
            if length is None:
                return
            if length == 0:
                raise IpfsFormatError("empty CAR section")
            if length > self.max_block + 128:
                raise IpfsFormatError(
                    f"CAR section of {length} bytes exceeds the {self.max_block}-byte block cap"
                )
            section = self._read(length)
            cid, end = CID.decode(section)
            yield cid, section[end:]


def car_section_span(
    buf: memoryview, pos: int, end: int, max_block: int = MAX_BLOCK
) -> tuple[int, int] | None:
    """(start of the CID, end of the section) for the CAR section at buf[pos:end], or None
    while its length prefix is incomplete. Reads only the prefix and copies nothing; the
    section itself may extend past `end`. Sections over `max_block` are refused."""
    stop = min(end, pos + 9)
    for i in range(pos, stop):
        if not buf[i] & 0x80:
            length, body = decode_varint(buf[: i + 1], pos)
            break
    else:
        if stop - pos >= 9:
            raise IpfsFormatError("CAR section length varint too long")
        return None
    if length == 0:
        raise IpfsFormatError("empty CAR section")
    if length > max_block + 128:
        raise IpfsFormatError(
            f"CAR section of {length} bytes exceeds the {max_block}-byte block cap"
        )
    return body, body + length


def encode_car(roots: list[CID], blocks: list[tuple[CID, bytes]]) -> bytes:
    out = bytearray(encode_car_header(roots))
    for cid, block in blocks:
        raw = cid.to_bytes()
        out += encode_varint(len(raw) + len(block)) + raw + block
    return bytes(out)

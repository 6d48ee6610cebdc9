"""bootlink's wire messages: pure encode/decode functions, no sockets.

Every exchange starts with a fresh nonce from the asker that the answer must bind, so a
recorded answer is worthless later, and every payload is AES-EAX sealed under a sub-key
of the shared key (see keys.Purpose), so nothing unauthenticated is acted upon.

Discovery (UDP, to ff02::1 on each probed NIC):
    probe  = MAGIC | 0x01 | client_nonce[16]
    answer = MAGIC | 0x02 | client_nonce[16] | server_nonce[16] | EAX(k_disc, server_nonce,
             header = MAGIC|0x02|client_nonce, json{http_port, nbd_port, challenge, name})

Remote trigger (UDP, same port: the laptop's normal OS runs `bootlink autokexec`, which
answers probes so that a desktop can ask it to kexec into the server ramdisk):
    offer   = MAGIC | 0x05 | client_nonce[16] | server_nonce[16] | EAX(k_trig, server_nonce,
              header = MAGIC|0x05|client_nonce, json{challenge, name})
    trigger = MAGIC | 0x06 | challenge[16] | nonce[16] | EAX(k_trig, nonce,
              header = MAGIC|0x06|challenge, json{action: "kexec-server"})
    The autokexec accepts each challenge once and only for a short time: a recorded
    trigger replayed later finds its challenge spent.

Boot transfer (HTTP POST /v1/boot):
    request  = MAGIC | 0x03 | request_nonce[16] | EAX(k_xfer, request_nonce,
               header = MAGIC|0x03, json{challenge, want})
    The server accepts each discovery `challenge` once: a replayed request finds it spent.
    response = frame 0 under a session key k_sess = HKDF(k_xfer, challenge | request_nonce),
               fresh for this request, then frames 1.. under the payload key:
    frame    = length[4, BE] | flags[1] | EAX(key, nonce=counter[16], header =
               MAGIC|0x04|counter[8]|flags, body) with body[-16:] the tag
    Frame 0 is the JSON manifest: files (name, size, SHA-256), cmdline, NBD coordinates, and
    `payload_key`, a random AES-128 key under which the server sealed the payload once (when
    the files last changed) as frames 1.. (kernel bytes then initrd bytes; FLAG_LAST marks
    the final, empty frame). Sealing once lets the server send the same sealed bytes to
    every request with sendfile(2) instead of spending a core on AES per request. The
    payload frames are the same for every request, but only a client that opened this
    request's fresh manifest learns their key, and a payload that changes gets a new key:
    old frames replayed into a new stream fail authentication. A counter in the header
    detects reordering; a stream that ends without FLAG_LAST is truncated.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import eax
from .errors import ProtocolError

MAGIC = b"BLK1"
NONCE_SIZE = 16
CHALLENGE_SIZE = 16

T_PROBE = 0x01
T_ANSWER = 0x02
T_BOOT_REQUEST = 0x03
T_FRAME = 0x04
T_TRIGGER_OFFER = 0x05
T_TRIGGER = 0x06

FLAG_LAST = 0x01
FRAME_HEAD = struct.Struct(">IB")  # sealed length, flags
MAX_FRAME = 16 << 20  # a peer can't make us allocate more than this per frame
MAX_DATAGRAM = 1400
MAX_JSON = 64 << 10


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


# --- discovery -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerOffer:
    """What a server tells a prober that sent it a nonce (sealed, bound to that nonce)."""

    http_port: int
    nbd_port: int
    challenge: bytes  # single-use token the client must return inside its boot request
    name: str = ""


def encode_probe(client_nonce: bytes) -> bytes:
    _need(len(client_nonce) == NONCE_SIZE, "probe nonce must be 16 bytes")
    return MAGIC + bytes([T_PROBE]) + client_nonce


def decode_probe(datagram: bytes) -> bytes:
    """Return the client nonce of a well-formed probe, else raise ProtocolError."""
    _need(len(datagram) == 4 + 1 + NONCE_SIZE, "probe has the wrong length")
    _need(datagram[:4] == MAGIC and datagram[4] == T_PROBE, "not a bootlink probe")
    return datagram[5:]


def encode_answer(k_disc: bytes, client_nonce: bytes, offer: ServerOffer) -> bytes:
    server_nonce = new_nonce()
    header = MAGIC + bytes([T_ANSWER]) + client_nonce
    body = _json_bytes(
        {
            "http_port": offer.http_port,
            "nbd_port": offer.nbd_port,
            "challenge": offer.challenge.hex(),
            "name": offer.name,
        }
    )
    return header + server_nonce + eax.seal(k_disc, server_nonce, body, header)


class WrongKey(ProtocolError):
    """A message bound to our nonce whose seal does not open under our key."""


def decode_answer(k_disc: bytes, expected_nonce: bytes, datagram: bytes) -> ServerOffer:
    """Open an answer; it only counts if it is sealed under our key AND binds our nonce."""
    _need(len(datagram) >= 5 + 2 * NONCE_SIZE + eax.TAG_SIZE, "answer too short")
    _need(datagram[:4] == MAGIC and datagram[4] == T_ANSWER, "not a bootlink answer")
    header, rest = datagram[: 5 + NONCE_SIZE], datagram[5 + NONCE_SIZE :]
    if header[5:] != expected_nonce:
        raise ProtocolError("answer binds another probe's nonce (replayed or stale)")
    server_nonce, sealed = rest[:NONCE_SIZE], rest[NONCE_SIZE:]
    try:
        body = eax.open_(k_disc, server_nonce, sealed, header)
    except eax.InvalidTag:
        raise WrongKey("answer not sealed with our key (another key, or tampered)") from None
    obj = _json_obj(body, "answer")
    try:
        offer = ServerOffer(
            http_port=_port(obj["http_port"]),
            nbd_port=_port(obj["nbd_port"]),
            challenge=bytes.fromhex(obj["challenge"]),
            name=str(obj.get("name", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"answer body malformed: {exc}") from None
    _need(len(offer.challenge) == CHALLENGE_SIZE, "answer challenge has the wrong length")
    return offer


# --- remote trigger (autokexec) -----------------------------------------------------------


@dataclass(frozen=True)
class TriggerOffer:
    challenge: bytes
    name: str = ""


def encode_trigger_offer(k_trig: bytes, client_nonce: bytes, offer: TriggerOffer) -> bytes:
    server_nonce = new_nonce()
    header = MAGIC + bytes([T_TRIGGER_OFFER]) + client_nonce
    body = _json_bytes({"challenge": offer.challenge.hex(), "name": offer.name})
    return header + server_nonce + eax.seal(k_trig, server_nonce, body, header)


def decode_trigger_offer(k_trig: bytes, expected_nonce: bytes, datagram: bytes) -> TriggerOffer:
    _need(len(datagram) >= 5 + 2 * NONCE_SIZE + eax.TAG_SIZE, "trigger offer too short")
    _need(datagram[:4] == MAGIC and datagram[4] == T_TRIGGER_OFFER, "not a trigger offer")
    header, rest = datagram[: 5 + NONCE_SIZE], datagram[5 + NONCE_SIZE :]
    if header[5:] != expected_nonce:
        raise ProtocolError("trigger offer binds another probe's nonce (replayed or stale)")
    try:
        body = eax.open_(k_trig, rest[:NONCE_SIZE], rest[NONCE_SIZE:], header)
    except eax.InvalidTag:
        raise ProtocolError("trigger offer not sealed with our key") from None
    obj = _json_obj(body, "trigger offer")
    try:
        offer = TriggerOffer(bytes.fromhex(obj["challenge"]), str(obj.get("name", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"trigger offer malformed: {exc}") from None
    _need(len(offer.challenge) == CHALLENGE_SIZE, "trigger challenge has the wrong length")
    return offer


def encode_trigger(k_trig: bytes, challenge: bytes) -> bytes:
    nonce = new_nonce()
    header = MAGIC + bytes([T_TRIGGER]) + challenge
    body = _json_bytes({"action": "kexec-server"})
    return header + nonce + eax.seal(k_trig, nonce, body, header)


def decode_trigger(k_trig: bytes, datagram: bytes) -> bytes:
    """Return the challenge an authentic trigger redeems (the caller checks it is live)."""
    _need(len(datagram) >= 5 + CHALLENGE_SIZE + NONCE_SIZE + eax.TAG_SIZE, "trigger too short")
    _need(datagram[:4] == MAGIC and datagram[4] == T_TRIGGER, "not a trigger")
    header = datagram[: 5 + CHALLENGE_SIZE]
    nonce = datagram[5 + CHALLENGE_SIZE : 5 + CHALLENGE_SIZE + NONCE_SIZE]
    try:
        body = eax.open_(k_trig, nonce, datagram[5 + CHALLENGE_SIZE + NONCE_SIZE :], header)
    except eax.InvalidTag:
        raise ProtocolError("trigger not sealed with our key") from None
    _need(_json_obj(body, "trigger").get("action") == "kexec-server", "trigger action unknown")
    return header[5:]


# --- boot request ---------------------------------------------------------------------------


def encode_boot_request(k_xfer: bytes, challenge: bytes, request_nonce: bytes) -> bytes:
    header = MAGIC + bytes([T_BOOT_REQUEST])
    body = _json_bytes({"challenge": challenge.hex(), "want": "boot"})
    return header + request_nonce + eax.seal(k_xfer, request_nonce, body, header)


def decode_boot_request(k_xfer: bytes, data: bytes) -> tuple[bytes, bytes]:
    """Return (challenge, request_nonce) of an authentic request, else raise ProtocolError."""
    _need(len(data) >= 5 + NONCE_SIZE + eax.TAG_SIZE, "boot request too short")
    _need(len(data) <= MAX_JSON, "boot request too long")
    _need(data[:4] == MAGIC and data[4] == T_BOOT_REQUEST, "not a bootlink boot request")
    header, nonce, sealed = data[:5], data[5 : 5 + NONCE_SIZE], data[5 + NONCE_SIZE :]
    try:
        body = eax.open_(k_xfer, nonce, sealed, header)
    except eax.InvalidTag:
        raise ProtocolError("boot request not sealed with our key") from None
    obj = _json_obj(body, "boot request")
    try:
        challenge = bytes.fromhex(obj["challenge"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("boot request lacks a valid challenge") from None
    _need(len(challenge) == CHALLENGE_SIZE, "boot request challenge has the wrong length")
    _need(obj.get("want") == "boot", "boot request asks for something unknown")
    return challenge, nonce


# --- boot manifest and framed stream --------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class NbdInfo:
    port: int
    export: str
    size: int
    read_only: bool
    first_sector_sha256: str  # lets the client prove it reaches the very disk described


@dataclass(frozen=True)
class BootManifest:
    files: list[FileEntry]
    cmdline: str
    nbd: NbdInfo
    server_name: str = ""
    chunk_size: int = 1 << 20
    version: int = 2
    extra: dict[str, Any] = field(default_factory=dict)
    # the key of frames 1..: secret, so never printed with the rest
    payload_key: bytes = field(default=b"", repr=False)

    def to_bytes(self) -> bytes:
        return _json_bytes({**asdict(self), "payload_key": self.payload_key.hex()})

    @classmethod
    def from_bytes(cls, data: bytes) -> BootManifest:
        obj = _json_obj(data, "manifest")
        try:
            _need(
                obj["version"] == 2,
                f"manifest version {obj['version']} is not ours: run the same bootlink "
                "release on both machines",
            )
            files = [
                FileEntry(str(f["name"]), _nonneg(f["size"]), _hexdigest(f["sha256"]))
                for f in obj["files"]
            ]
            n = obj["nbd"]
            nbd = NbdInfo(
                port=_port(n["port"]),
                export=str(n["export"]),
                size=_nonneg(n["size"]),
                read_only=bool(n["read_only"]),
                first_sector_sha256=_hexdigest(n["first_sector_sha256"]),
            )
            chunk = _nonneg(obj["chunk_size"])
            _need(0 < chunk <= MAX_FRAME - 64, "manifest chunk size out of range")
            payload_key = bytes.fromhex(obj["payload_key"])
            _need(len(payload_key) == 16, "manifest payload key has the wrong length")
            return cls(
                files=files,
                cmdline=str(obj["cmdline"]),
                nbd=nbd,
                server_name=str(obj.get("server_name", "")),
                chunk_size=chunk,
                extra=dict(obj.get("extra") or {}),
                payload_key=payload_key,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"manifest malformed: {exc!r}") from None

    @property
    def payload_size(self) -> int:
        return sum(f.size for f in self.files)


def session_key(k_xfer: bytes, challenge: bytes, request_nonce: bytes) -> bytes:
    """The per-request stream key: fresh for every (challenge, request nonce) pair.

    AES-128: EAX's CMAC is a serial CBC chain, so its speed is AES latency per block, and
    AES-128 has 10 rounds to AES-256's 14 — 1.4x the throughput of the bulk transfer. A
    128-bit key used for one transfer only is far beyond what anyone can brute-force.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(
        algorithm=hashes.SHA256(), length=16, salt=challenge + request_nonce, info=b"session"
    ).derive(k_xfer)


def _frame_header(counter: int, flags: int) -> bytes:
    return MAGIC + bytes([T_FRAME]) + counter.to_bytes(8, "big") + bytes([flags])


def seal_frame(key: bytes, counter: int, flags: int, body: bytes) -> bytes:
    return seal_frames(key, [(counter, flags, body)])[0]


def seal_frames(key: bytes, frames: Sequence[tuple[int, int, bytes]]) -> list[bytes]:
    """`seal_frame` for several (counter, flags, body) at once (MACs side by side)."""
    sealed = eax.seal_many(
        key,
        [(c.to_bytes(16, "big"), body, _frame_header(c, flags)) for c, flags, body in frames],
    )
    return [
        FRAME_HEAD.pack(len(s), flags) + s for s, (_, flags, _) in zip(sealed, frames, strict=True)
    ]


@dataclass(frozen=True)
class RawFrame:
    counter: int
    flags: int
    sealed: memoryview  # the frame's bytes, a view of a (possibly reused) bytearray

    @property
    def last(self) -> bool:
        return bool(self.flags & FLAG_LAST)


def open_frame(key: bytes, frame: RawFrame) -> memoryview:
    """Verify a frame and decrypt it in place: returns the plaintext as a view of
    `frame.sealed`, valid until that buffer is reused."""
    return open_frames(key, [frame])[0]


def open_frames(key: bytes, frames: Sequence[RawFrame]) -> list[memoryview]:
    """`open_frame` for consecutive frames at once (their MACs run side by side: see
    eax.open_many_in_place); raises ProtocolError naming the first that fails."""
    sealed = [
        eax.Sealed(f.counter.to_bytes(16, "big"), f.sealed, _frame_header(f.counter, f.flags))
        for f in frames
    ]
    try:
        opened = eax.open_many_in_place(key, sealed)
    except eax.InvalidTag as exc:  # a frame too short to hold a tag
        raise ProtocolError(f"malformed frame in the boot stream ({exc})") from None
    for frame, plain in zip(frames, opened, strict=True):
        if plain is None:
            raise ProtocolError(
                f"frame {frame.counter} failed authentication (tampered, reordered or foreign)"
            )
    return opened  # type: ignore[return-value]  # no None left


class FrameReader:
    """Reads frames in order from a byte stream (anything with `readinto`, like a file or
    an HTTP response), each into one buffer: by default a new one of its exact size,
    or one handed out by `buffers` (a callable returning a bytearray of at least
    `max_length` bytes), so a 1 MiB frame costs no allocation at all.

    `next(key)` reads and opens one frame; `raw_frames()` and `raw_batches()` yield
    still-sealed frames (to be opened in parallel with `open_frame` / `open_frames`).
    """

    def __init__(self, stream, max_length: int = MAX_FRAME) -> None:
        self._stream = stream
        self.max_length = max_length
        self.counter = 0
        self.finished = False

    def next(self, key: bytes) -> tuple[bytes, bool]:
        """Return (plaintext, is_last). Raises ProtocolError on truncation/tamper/reorder."""
        raw = self.read_raw()
        return bytes(open_frame(key, raw)), raw.last

    def read_raw(self, buffers=None) -> RawFrame:
        if self.finished:
            raise ProtocolError("read past the last frame")
        head = self._read_exact(bytearray(FRAME_HEAD.size), FRAME_HEAD.size, "frame header")
        length, flags = FRAME_HEAD.unpack(head)
        _need(eax.TAG_SIZE <= length <= self.max_length, f"frame length {length} out of range")
        _need(flags & ~FLAG_LAST == 0, "frame has unknown flags")
        buf = buffers() if buffers else bytearray(length)
        raw = RawFrame(self.counter, flags, self._read_exact(buf, length, "frame body"))
        self.counter += 1
        self.finished = raw.last
        return raw

    def raw_frames(self, buffers=None):
        """Every remaining frame, sealed, up to and including the last one."""
        while not self.finished:
            yield self.read_raw(buffers)

    def raw_batches(self, size: int, buffers=None):
        """The remaining frames, sealed, in lists of up to `size` (for `open_frames`).
        If the stream breaks, the frames read before the break come out first, then
        the error: the consumer meets it where the stream broke."""
        while not self.finished:
            batch: list[RawFrame] = []
            try:
                while len(batch) < size and not self.finished:
                    batch.append(self.read_raw(buffers))
            except ProtocolError:
                if batch:
                    yield batch
                raise
            yield batch

    def _read_exact(self, buf: bytearray, n: int, what: str) -> memoryview:
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            try:
                k = self._stream.readinto(view[got:])
            except OSError:  # reset or timeout mid-stream: the same as a cut
                k = 0
            if not k:
                raise ProtocolError(
                    f"stream truncated in {what} after frame {self.counter}: the link dropped "
                    "(cable pulled, laptop gone or asleep); check the cable and retry"
                )
            got += k
        return view


# --- helpers --------------------------------------------------------------------------------


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise ProtocolError(why)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _json_obj(data: bytes, what: str) -> dict[str, Any]:
    _need(len(data) <= MAX_JSON, f"{what} too long")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{what} is not valid JSON") from None
    except RecursionError:  # only a key holder can seal it, but it must not crash anyone
        raise ProtocolError(f"{what} is malformed: JSON nested too deeply") from None
    _need(isinstance(obj, dict), f"{what} is not a JSON object")
    return obj


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"bad port {v!r}")
    return v


def _nonneg(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"bad size {v!r}")
    return v


def _hexdigest(v: Any) -> str:
    if not isinstance(v, str) or len(v) != 64:
        raise ValueError(f"bad sha256 {v!r}")
    int(v, 16)
    return v.lower()

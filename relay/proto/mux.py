"""Frames of tunnel protocol v2: many streams multiplexed on one carrier.

Every frame is ``type:u8 stream:u32 length:u32 body[length]`` (big endian). Stream 0 belongs to
the carrier itself (PING, PONG, GOAWAY); every other frame names a stream. DATA carries its
offset, so a receiver can drop bytes it already has when a stream is replayed on another
carrier, and can tell a gap (a protocol error) from a duplicate. The layouts and the reasons
are in docs/PROTOCOL.md; the test vectors are in tests/unit/test_mux.py.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Union

from relay.proto import ProtocolError

DATA = 0x01
ACK = 0x02
FIN = 0x03
RST = 0x04
OPEN = 0x05
REPLY = 0x06
SYNC = 0x07
PING = 0x08
PONG = 0x09
GOAWAY = 0x0A

TYPE_NAMES = {
    DATA: "DATA",
    ACK: "ACK",
    FIN: "FIN",
    RST: "RST",
    OPEN: "OPEN",
    REPLY: "REPLY",
    SYNC: "SYNC",
    PING: "PING",
    PONG: "PONG",
    GOAWAY: "GOAWAY",
}

HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size
MAX_DATA = 128 * 1024
"""Largest payload of one DATA frame: what a stream sends at a time while it is the only one
with bytes to send on its carrier (bulk: a quarter of the per-frame work of DATA_STEP frames)."""
DATA_STEP = 32 * 1024
"""Payload of a DATA frame while other streams wait on the same carrier: the step of the fair
scheduler, so a bulk stream delays another stream's frame by at most this many bytes once both
are queued."""
MAX_REASON = 200
MAX_STREAM = 0xFFFFFFFF

_U64 = struct.Struct("!Q")
_DATA_HEAD = struct.Struct("!BIIQ")
DATA_OVERHEAD = _DATA_HEAD.size
_OFFSET_FLAG = struct.Struct("!QB")
_ADDR_MIN = 1 + 1 + 1 + 2  # ATYP, length, a one-letter domain, port
_ADDR_MAX = 1 + 1 + 255 + 2  # ATYP, length, domain, port

# Reset codes (RST body's first byte).
RST_ERROR = 0
RST_PEER_RESET = 1
RST_PROTOCOL = 2
RST_TIMEOUT = 3
RST_SHUTDOWN = 4
RST_UNKNOWN_STREAM = 5
RST_LIMIT = 6
RST_REFUSED = 7
RST_ANSWER = 8
"""The answer to a peer's RST, so that it may forget the stream; never answered itself."""
RST_CODE_NAMES = {
    RST_ERROR: "error",
    RST_PEER_RESET: "peer-reset",
    RST_PROTOCOL: "protocol-error",
    RST_TIMEOUT: "timeout",
    RST_SHUTDOWN: "shutdown",
    RST_UNKNOWN_STREAM: "unknown-stream",
    RST_LIMIT: "limit",
    RST_REFUSED: "refused",
    RST_ANSWER: "answer",
}

SYNC_FIN = 0x01
"""Flag of ACK and SYNC: the sender has received the peer's FIN."""


class Data(NamedTuple):
    stream: int
    offset: int
    payload: Union[bytes, memoryview]


class Ack(NamedTuple):
    """Cumulative bytes delivered: frees the sender's replay buffer and grants credit.
    ``fin``: the sender's FIN (at ``offset``) arrived too."""

    stream: int
    offset: int
    fin: bool


class Fin(NamedTuple):
    """The sender sends no more; ``offset`` is its total."""

    stream: int
    offset: int


class Reset(NamedTuple):
    stream: int
    code: int
    reason: str


class Open(NamedTuple):
    """Worker asks for a stream to ``address`` (SOCKS5 ATYP, address, port bytes)."""

    stream: int
    address: bytes


class Reply(NamedTuple):
    """Exit's answer to OPEN: a SOCKS5 reply code and the bound address bytes."""

    stream: int
    code: int
    address: bytes


class Sync(NamedTuple):
    """The stream continues on this carrier; the sender has received ``offset`` bytes."""

    stream: int
    offset: int
    fin: bool


class Ping(NamedTuple):
    token: int


class Pong(NamedTuple):
    token: int


class GoAway(NamedTuple):
    """The exit is draining: open no new streams on this session."""

    reason: str


Frame = Union[Data, Ack, Fin, Reset, Open, Reply, Sync, Ping, Pong, GoAway]

_CARRIER_TYPES = frozenset((PING, PONG, GOAWAY))


def data_header(stream: int, offset: int, length: int) -> bytes:
    """Header of a DATA frame; the payload follows it without being copied."""
    return _DATA_HEAD.pack(DATA, stream, 8 + length, offset)


def encode_ack(stream: int, offset: int, fin: bool = False) -> bytes:
    return HEADER.pack(ACK, stream, _OFFSET_FLAG.size) + _OFFSET_FLAG.pack(offset, 1 if fin else 0)


def encode_fin(stream: int, offset: int) -> bytes:
    return HEADER.pack(FIN, stream, 8) + _U64.pack(offset)


def encode_reset(stream: int, code: int, reason: str = "") -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return HEADER.pack(RST, stream, 1 + len(text)) + bytes((code & 0xFF,)) + text


def encode_open(stream: int, address: bytes) -> bytes:
    return HEADER.pack(OPEN, stream, len(address)) + address


def encode_reply(stream: int, code: int, address: bytes) -> bytes:
    return HEADER.pack(REPLY, stream, 1 + len(address)) + bytes((code & 0xFF,)) + address


def encode_sync(stream: int, offset: int, fin: bool) -> bytes:
    return HEADER.pack(SYNC, stream, _OFFSET_FLAG.size) + _OFFSET_FLAG.pack(
        offset, SYNC_FIN if fin else 0
    )


def encode_ping(token: int) -> bytes:
    return HEADER.pack(PING, 0, 8) + _U64.pack(token & 0xFFFFFFFFFFFFFFFF)


def encode_pong(token: int) -> bytes:
    return HEADER.pack(PONG, 0, 8) + _U64.pack(token & 0xFFFFFFFFFFFFFFFF)


def encode_goaway(reason: str = "") -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return HEADER.pack(GOAWAY, 0, len(text)) + text


def encode(frame: Frame) -> bytes:
    """Any frame as bytes; the data path uses :func:`data_header` instead."""
    if isinstance(frame, Data):
        return data_header(frame.stream, frame.offset, len(frame.payload)) + bytes(frame.payload)
    if isinstance(frame, Ack):
        return encode_ack(frame.stream, frame.offset, frame.fin)
    if isinstance(frame, Fin):
        return encode_fin(frame.stream, frame.offset)
    if isinstance(frame, Reset):
        return encode_reset(frame.stream, frame.code, frame.reason)
    if isinstance(frame, Open):
        return encode_open(frame.stream, frame.address)
    if isinstance(frame, Reply):
        return encode_reply(frame.stream, frame.code, frame.address)
    if isinstance(frame, Sync):
        return encode_sync(frame.stream, frame.offset, frame.fin)
    if isinstance(frame, Ping):
        return encode_ping(frame.token)
    if isinstance(frame, Pong):
        return encode_pong(frame.token)
    return encode_goaway(frame.reason)


def check_address(raw: bytes) -> None:
    """A SOCKS5 address (ATYP, address, port) exactly filling ``raw``."""
    if not raw:
        raise ProtocolError("empty address")
    atyp = raw[0]
    if atyp == 0x01:
        want = 1 + 4 + 2
    elif atyp == 0x04:
        want = 1 + 16 + 2
    elif atyp == 0x03:
        if len(raw) < 2 or raw[1] == 0:
            raise ProtocolError("empty domain name")
        want = 2 + raw[1] + 2
    else:
        raise ProtocolError(f"address type 0x{atyp:02x}")
    if len(raw) != want:
        raise ProtocolError(f"address of {len(raw)} bytes, expected {want}")


def _body_ok(ftype: int, stream: int, length: int) -> None:
    if ftype not in TYPE_NAMES:
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
    if (ftype in _CARRIER_TYPES) != (stream == 0):
        raise ProtocolError(f"{TYPE_NAMES[ftype]} frame on stream {stream}")
    if ftype == DATA:
        ok = 8 < length <= 8 + MAX_DATA
    elif ftype in (FIN, PING, PONG):
        ok = length == 8
    elif ftype in (ACK, SYNC):
        ok = length == _OFFSET_FLAG.size
    elif ftype == RST:
        ok = 1 <= length <= 1 + MAX_REASON
    elif ftype == OPEN:
        ok = _ADDR_MIN <= length <= _ADDR_MAX
    elif ftype == REPLY:
        ok = 1 + _ADDR_MIN <= length <= 1 + _ADDR_MAX
    else:  # GOAWAY
        ok = length <= MAX_REASON
    if not ok:
        raise ProtocolError(f"{TYPE_NAMES[ftype]} frame with length {length}")


class FrameDecoder:
    """Incremental decoder: any split of the byte stream gives the same frames.

    A DATA payload may come out as several consecutive Data frames (one per chunk fed), each
    with its own offset; their concatenation is the frame's payload.
    """

    __slots__ = ("_buf", "_data_left", "_data_offset", "_data_stream", "_failed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data_left = 0
        self._data_stream = 0
        self._data_offset = 0
        self._failed = False

    def feed(self, data: Union[bytes, memoryview]) -> list[Frame]:
        if self._failed:
            raise ProtocolError("decoder already failed")
        try:
            return self._feed(data)
        except ProtocolError:
            self._failed = True
            raise

    def _feed(self, data: Union[bytes, memoryview]) -> list[Frame]:
        out: list[Frame] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        buf = self._buf
        while pos < end:
            if self._data_left:
                take = min(self._data_left, end - pos)
                payload = data if (pos == 0 and take == end) else view[pos : pos + take]
                out.append(Data(self._data_stream, self._data_offset, payload))
                self._data_left -= take
                self._data_offset += take
                pos += take
                continue
            need = HEADER_SIZE - len(buf)
            if need > 0:
                buf += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(buf) < HEADER_SIZE:
                    break
            ftype, stream, length = HEADER.unpack_from(buf, 0)
            _body_ok(ftype, stream, length)
            want = HEADER_SIZE + (8 if ftype == DATA else length) - len(buf)
            take = min(want, end - pos)
            if take:
                buf += view[pos : pos + take]
                pos += take
            if take < want:
                break
            if ftype == DATA:
                self._data_stream = stream
                self._data_offset = _U64.unpack_from(buf, HEADER_SIZE)[0]
                self._data_left = length - 8
            else:
                out.append(_control(ftype, stream, bytes(buf[HEADER_SIZE:])))
            del buf[:]
        return out

    @property
    def mid_frame(self) -> bool:
        return bool(self._buf) or self._data_left > 0


def _control(ftype: int, stream: int, body: bytes) -> Frame:
    if ftype == ACK:
        offset, flags = _OFFSET_FLAG.unpack(body)
        if flags & ~1:
            raise ProtocolError(f"ACK with unknown flags 0x{flags:02x}")
        return Ack(stream, offset, bool(flags & 1))
    if ftype == FIN:
        return Fin(stream, _U64.unpack(body)[0])
    if ftype == RST:
        return Reset(stream, body[0], body[1:].decode("utf-8", "replace"))
    if ftype == OPEN:
        check_address(body)
        return Open(stream, body)
    if ftype == REPLY:
        check_address(body[1:])
        return Reply(stream, body[0], body[1:])
    if ftype == SYNC:
        offset, flags = _OFFSET_FLAG.unpack(body)
        if flags & ~SYNC_FIN:
            raise ProtocolError(f"SYNC with unknown flags 0x{flags:02x}")
        return Sync(stream, offset, bool(flags & SYNC_FIN))
    if ftype == PING:
        return Ping(_U64.unpack(body)[0])
    if ftype == PONG:
        return Pong(_U64.unpack(body)[0])
    return GoAway(body.decode("utf-8", "replace"))

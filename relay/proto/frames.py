"""Tunnel data-phase frame codec.

Every frame is ``type:u8 length:u32`` followed by ``length`` bytes of body (big endian).
DATA payloads are handed out as they arrive, without waiting for the whole frame, so a bulk
transfer is never held back or copied to reassemble frames.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Union

from relay.proto import ProtocolError

DATA = 0x01
ACK = 0x02
PING = 0x03
PONG = 0x04
FIN = 0x05
RST = 0x06

HEADER = struct.Struct("!BI")
HEADER_SIZE = HEADER.size
MAX_DATA = 256 * 1024
"""Largest DATA payload a sender puts in one frame and a receiver accepts."""
MAX_REASON = 200

_U64 = struct.Struct("!Q")
_ACK = struct.Struct("!QB")
_FIN = _U64
_RST_HEAD = struct.Struct("!B")

# Reset codes, carried in RST frames and shown in logs.
RST_GENERIC = 0
RST_PEER_RESET = 1
"""The application or destination reset its connection."""
RST_PROTOCOL = 2
RST_TIMEOUT = 3
RST_SHUTDOWN = 4
RST_UNKNOWN_SESSION = 5
RST_CODE_NAMES = {
    RST_GENERIC: "error",
    RST_PEER_RESET: "peer-reset",
    RST_PROTOCOL: "protocol-error",
    RST_TIMEOUT: "timeout",
    RST_SHUTDOWN: "shutdown",
    RST_UNKNOWN_SESSION: "unknown-session",
}


class Data(NamedTuple):
    payload: Union[bytes, memoryview]


class Ack(NamedTuple):
    offset: int
    fin: bool


class Ping(NamedTuple):
    token: int


class Pong(NamedTuple):
    token: int


class Fin(NamedTuple):
    offset: int


class Reset(NamedTuple):
    code: int
    reason: str


Frame = Union[Data, Ack, Ping, Pong, Fin, Reset]

_FIXED_BODY = {ACK: _ACK.size, PING: 8, PONG: 8, FIN: _FIN.size}


def data_header(length: int) -> bytes:
    """Header for a DATA frame; the payload is written after it without being copied."""
    return HEADER.pack(DATA, length)


def encode_ack(offset: int, fin: bool = False) -> bytes:
    return HEADER.pack(ACK, _ACK.size) + _ACK.pack(offset, 1 if fin else 0)


def encode_ping(token: int) -> bytes:
    return HEADER.pack(PING, 8) + _U64.pack(token & 0xFFFFFFFFFFFFFFFF)


def encode_pong(token: int) -> bytes:
    return HEADER.pack(PONG, 8) + _U64.pack(token & 0xFFFFFFFFFFFFFFFF)


def encode_fin(offset: int) -> bytes:
    return HEADER.pack(FIN, _FIN.size) + _FIN.pack(offset)


def encode_reset(code: int, reason: str = "") -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return HEADER.pack(RST, 1 + len(text)) + _RST_HEAD.pack(code & 0xFF) + text


def encode(frame: Frame) -> bytes:
    """Encode any frame; the hot path uses :func:`data_header` instead."""
    if isinstance(frame, Data):
        return data_header(len(frame.payload)) + bytes(frame.payload)
    if isinstance(frame, Ack):
        return encode_ack(frame.offset, frame.fin)
    if isinstance(frame, Ping):
        return encode_ping(frame.token)
    if isinstance(frame, Pong):
        return encode_pong(frame.token)
    if isinstance(frame, Fin):
        return encode_fin(frame.offset)
    return encode_reset(frame.code, frame.reason)


class FrameDecoder:
    """Incremental decoder: feed any split of the byte stream, get the same frames back.

    DATA payloads may come out in several pieces (one per received chunk); their
    concatenation is the frame's payload.
    """

    __slots__ = ("_buf", "_data_left")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data_left = 0

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        buf = self._buf
        while pos < end:
            if self._data_left:
                take = min(self._data_left, end - pos)
                if pos == 0 and take == end:
                    out.append(Data(data))
                else:
                    out.append(Data(view[pos : pos + take]))
                self._data_left -= take
                pos += take
                continue
            need = HEADER_SIZE - len(buf)
            if need > 0:
                buf += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(buf) < HEADER_SIZE:
                    break
            ftype, length = HEADER.unpack_from(buf, 0)
            if ftype == DATA:
                if length == 0 or length > MAX_DATA:
                    raise ProtocolError(f"DATA frame length {length} out of range")
                del buf[:]
                self._data_left = length
                continue
            body_len = _FIXED_BODY.get(ftype)
            if body_len is None:
                if ftype != RST:
                    raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
                if length < 1 or length > 1 + MAX_REASON:
                    raise ProtocolError(f"RST frame length {length} out of range")
            elif length != body_len:
                raise ProtocolError(f"frame type 0x{ftype:02x} with length {length}")
            have = len(buf) - HEADER_SIZE
            want = length - have
            take = min(want, end - pos)
            buf += view[pos : pos + take]
            pos += take
            if take < want:
                break
            out.append(_control(ftype, bytes(buf[HEADER_SIZE:])))
            del buf[:]
        return out

    @property
    def mid_frame(self) -> bool:
        """True while a frame has started but not ended (a clean close must not cut one)."""
        return bool(self._buf) or self._data_left > 0


def _control(ftype: int, body: bytes) -> Frame:
    if ftype == ACK:
        offset, flags = _ACK.unpack(body)
        if flags & ~1:
            raise ProtocolError(f"ACK with unknown flags 0x{flags:02x}")
        return Ack(offset, bool(flags & 1))
    if ftype == PING:
        return Ping(_U64.unpack(body)[0])
    if ftype == PONG:
        return Pong(_U64.unpack(body)[0])
    if ftype == FIN:
        return Fin(_FIN.unpack(body)[0])
    return Reset(body[0], body[1:].decode("utf-8", "replace"))

"""HELLO sub-negotiation of the tunnel method (SOCKS5 method 0x80): mutual HMAC authentication.

The worker proves it holds the key's secret, the exit proves the same back over the worker's
MAC (so a recorded reply cannot be replayed to a worker). A carrier that joins an existing
session (non-zero session id: a second carrier, or a resume after carriers died) is
authenticated with the session key derived at the first HELLO instead, so somebody who only
saw the session id on the wire cannot take the session over. The ``recv_offset`` fields of
version 1 are reserved (zero): offsets are per stream now (relay.proto.session).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import NamedTuple, Optional

from relay.proto import ProtocolError

METHOD_TUNNEL = 0x80
VERSION = 2
NONCE_SIZE = 16
SESSION_ID_SIZE = 16
MAC_SIZE = 32
MAX_KEY_ID = 64
NEW_SESSION = bytes(SESSION_ID_SIZE)
CLOCK_WINDOW_S = 120.0
"""The exit refuses HELLOs whose timestamp is further than this from its clock."""

_HELLO_LABEL = b"hpc-relay/2 hello"
_REPLY_LABEL = b"hpc-relay/2 hello-reply"
_SESSION_LABEL = b"hpc-relay/2 session"

# ts_ms, nonce, session, recv_offset, heartbeat_ms, flags
_HELLO_TAIL = struct.Struct("!Q16s16sQIB")
# version, status, session, recv_offset, heartbeat_ms, nonce, ts_ms
_REPLY_BODY = struct.Struct("!BB16sQI16sQ")
REPLY_SIZE = _REPLY_BODY.size + MAC_SIZE

# Reply status codes.
OK = 0
FAILURE = 1
BAD_AUTH = 2
CLOCK_SKEW = 3
REPLAY = 4
UNKNOWN_SESSION = 5
BAD_VERSION = 6
BUSY = 7
STATUS_NAMES = {
    OK: "ok",
    FAILURE: "failure",
    BAD_AUTH: "bad-auth",
    CLOCK_SKEW: "clock-skew",
    REPLAY: "replay",
    UNKNOWN_SESSION: "unknown-session",
    BAD_VERSION: "bad-version",
    BUSY: "busy",
}


class Hello(NamedTuple):
    key_id: str
    timestamp_ms: int
    nonce: bytes
    session_id: bytes
    recv_offset: int
    heartbeat_ms: int
    flags: int
    mac: bytes
    signed: bytes
    """The bytes the MAC covers (everything before it), kept for verification."""

    @property
    def is_resume(self) -> bool:
        return self.session_id != NEW_SESSION


class HelloReply(NamedTuple):
    status: int
    session_id: bytes
    recv_offset: int
    heartbeat_ms: int
    nonce: bytes
    timestamp_ms: int
    mac: bytes
    signed: bytes


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, label, hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


def session_key(secret: bytes, worker_nonce: bytes, exit_nonce: bytes, session_id: bytes) -> bytes:
    """Key that authenticates resumes of one session; both ends derive it at the first HELLO."""
    return _mac(secret, _SESSION_LABEL, worker_nonce, exit_nonce, session_id)


def encode_hello(
    key: bytes,
    key_id: str,
    timestamp_ms: int,
    nonce: bytes,
    session_id: bytes = NEW_SESSION,
    recv_offset: int = 0,
    heartbeat_ms: int = 0,
) -> bytes:
    """Build a HELLO; ``key`` is the key's secret, or the session key for a resume.
    ``heartbeat_ms`` 0 leaves the heartbeat to the exit."""
    kid = key_id.encode("ascii")
    if not 1 <= len(kid) <= MAX_KEY_ID:
        raise ValueError("key id must be 1..64 ASCII characters")
    if len(nonce) != NONCE_SIZE or len(session_id) != SESSION_ID_SIZE:
        raise ValueError("nonce and session id must be 16 bytes")
    signed = (
        bytes((VERSION, len(kid)))
        + kid
        + _HELLO_TAIL.pack(timestamp_ms, nonce, session_id, recv_offset, heartbeat_ms, 0)
    )
    return signed + _mac(key, _HELLO_LABEL, signed)


def decode_hello(buf: bytes | bytearray) -> Optional[tuple[Hello, int]]:
    """Parse a HELLO from the front of ``buf``; None if more bytes are needed."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise ProtocolError(f"unsupported HELLO version {buf[0]}")
    klen = buf[1]
    if not 1 <= klen <= MAX_KEY_ID:
        raise ProtocolError(f"HELLO key id length {klen} out of range")
    total = 2 + klen + _HELLO_TAIL.size + MAC_SIZE
    if len(buf) < total:
        return None
    raw = bytes(buf[:total])
    try:
        key_id = raw[2 : 2 + klen].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("HELLO key id is not ASCII") from None
    ts, nonce, session, offset, hb, flags = _HELLO_TAIL.unpack_from(raw, 2 + klen)
    signed = raw[: total - MAC_SIZE]
    return Hello(key_id, ts, nonce, session, offset, hb, flags, raw[-MAC_SIZE:], signed), total


def verify_hello(hello: Hello, key: bytes) -> bool:
    return hmac.compare_digest(hello.mac, _mac(key, _HELLO_LABEL, hello.signed))


def encode_reply(
    key: Optional[bytes],
    hello_mac: bytes,
    status: int,
    session_id: bytes = NEW_SESSION,
    recv_offset: int = 0,
    heartbeat_ms: int = 0,
    nonce: bytes = bytes(NONCE_SIZE),
    timestamp_ms: int = 0,
) -> bytes:
    """Build the exit's answer; a failure is sent unauthenticated (``key`` None, zero MAC)."""
    body = _REPLY_BODY.pack(
        VERSION, status, session_id, recv_offset, heartbeat_ms, nonce, timestamp_ms
    )
    mac = bytes(MAC_SIZE) if key is None else _mac(key, _REPLY_LABEL, hello_mac, body)
    return body + mac


def decode_reply(buf: bytes | bytearray) -> Optional[tuple[HelloReply, int]]:
    if len(buf) < 1:
        return None
    if buf[0] != VERSION:
        raise ProtocolError(f"unsupported HELLO reply version {buf[0]}")
    if len(buf) < REPLY_SIZE:
        return None
    raw = bytes(buf[:REPLY_SIZE])
    _, status, session, offset, hb, nonce, ts = _REPLY_BODY.unpack_from(raw, 0)
    signed = raw[: _REPLY_BODY.size]
    return HelloReply(status, session, offset, hb, nonce, ts, raw[-MAC_SIZE:], signed), REPLY_SIZE


def verify_reply(reply: HelloReply, key: bytes, hello_mac: bytes) -> bool:
    return hmac.compare_digest(reply.mac, _mac(key, _REPLY_LABEL, hello_mac, reply.signed))


class ReplayGuard:
    """Refuses HELLOs outside the clock window and nonces seen within it.

    A nonce only needs remembering for as long as its timestamp would still be accepted,
    so memory is bounded by the HELLO rate times twice the window.
    """

    def __init__(self, window_s: float = CLOCK_WINDOW_S, max_entries: int = 1_000_000) -> None:
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._seen: dict[bytes, int] = {}
        self._next_expire = 0

    def check(self, timestamp_ms: int, nonce: bytes, now_ms: int) -> int:
        """Return OK, CLOCK_SKEW, REPLAY, or BUSY when full; records the nonce when OK."""
        if abs(timestamp_ms - now_ms) > self.window_ms:
            return CLOCK_SKEW
        if nonce in self._seen:
            return REPLAY
        if now_ms >= self._next_expire or len(self._seen) >= self.max_entries:
            self.expire(now_ms)  # at most once a window unless full: amortised O(1)
            if len(self._seen) >= self.max_entries:
                return BUSY
        self._seen[nonce] = timestamp_ms
        return OK

    def expire(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        stale = [n for n, ts in self._seen.items() if ts < horizon]
        for n in stale:
            del self._seen[n]
        self._next_expire = now_ms + self.window_ms

    def __len__(self) -> int:
        return len(self._seen)

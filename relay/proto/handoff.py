"""Which process of a ``relay-exit --workers N`` group owns a connection, and the message that
hands an accepted connection to it (sans-IO).

The kernel spreads accepted connections over the processes at random (SO_REUSEPORT), but two
things must reach one particular process:

* a resume HELLO must reach the process that holds the session: a session id made by worker
  ``i`` of a group carries ``i`` in its first byte;
* a HELLO that opens a new session is routed by its nonce (a hash of it, modulo N), so a
  replayed HELLO always reaches the process whose nonce table has seen it.

A process that reads a HELLO it does not own passes the socket (SCM_RIGHTS) to the owner,
together with what it already read from it and how many answer bytes it already wrote, in a
:func:`encode` message; the owner parses the bytes again and answers as if it had accepted
the connection itself.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable, NamedTuple, Optional

from relay.proto import ProtocolError

MAX_PROCESSES = 64
"""Most processes in a group (the first byte of a session id names one of them)."""

MAX_HANDSHAKE_BYTES = 64 * 1024
"""Most handshake bytes one handoff carries; a connection that sent more before its HELLO
was complete is refused instead of handed off."""

VERSION = 1
KIND_NEW = 1
KIND_RESUME = 2
KIND_NAMES = {KIND_NEW: "new", KIND_RESUME: "resume"}

# version, kind, from process, answer bytes already sent, length of the data
_HEADER = struct.Struct("!BBBxII")
HEADER_SIZE = _HEADER.size
MAX_MESSAGE = HEADER_SIZE + MAX_HANDSHAKE_BYTES

_ROUTE_LABEL = b"hpc-relay/1 route"
_NEW_SESSION = bytes(16)


class Handoff(NamedTuple):
    kind: int
    source: int
    """Index of the process that accepted the connection."""
    sent: int
    """Answer bytes that process already wrote to the client (the owner skips as many)."""
    data: bytes
    """Every byte that process read from the connection, from the first."""


def nonce_owner(nonce: bytes, processes: int) -> int:
    """The process that checks (and remembers) a new-session HELLO with this nonce."""
    if processes <= 1:
        return 0
    digest = hashlib.sha256(_ROUTE_LABEL + nonce).digest()
    return int.from_bytes(digest[:8], "big") % processes


def session_owner(session_id: bytes, processes: int) -> Optional[int]:
    """The process that made ``session_id``; None if no process of this group can have."""
    if processes <= 1:
        return 0
    index = session_id[0] if session_id else processes
    return index if index < processes else None


def new_session_id(index: int, processes: int, random_bytes: Callable[[int], bytes]) -> bytes:
    """A 16-byte session id for process ``index``: fully random for a single process,
    else the index then 15 random bytes. Never the all-zero id that asks for a new session."""
    if not 0 <= index < max(processes, 1) or processes > MAX_PROCESSES:
        raise ValueError(f"process index {index} out of range for {processes} process(es)")
    while True:
        sid = random_bytes(16) if processes <= 1 else bytes((index,)) + random_bytes(15)
        if sid != _NEW_SESSION:
            return sid


def owner(is_resume: bool, nonce: bytes, session_id: bytes, index: int, processes: int) -> int:
    """Where a HELLO read by process ``index`` is handled: the session's maker for a resume
    (``index`` itself when no process made it: that one answers 'unknown session'), the
    nonce's process for a new session."""
    if is_resume:
        made_by = session_owner(session_id, processes)
        return index if made_by is None else made_by
    return nonce_owner(nonce, processes)


def encode(kind: int, source: int, sent: int, data: bytes) -> bytes:
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown handoff kind {kind}")
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise ValueError(f"{len(data)} handshake bytes are more than a handoff carries")
    if not 0 <= source < MAX_PROCESSES or not 0 <= sent <= len(data):
        raise ValueError("handoff source or sent count out of range")
    return _HEADER.pack(VERSION, kind, source, sent, len(data)) + data


def decode(message: bytes) -> Handoff:
    """Parse one handoff message (one datagram: it is whole or it is broken)."""
    if len(message) < HEADER_SIZE:
        raise ProtocolError(f"handoff message of {len(message)} bytes is shorter than its header")
    version, kind, source, sent, length = _HEADER.unpack_from(message, 0)
    if version != VERSION:
        raise ProtocolError(f"unsupported handoff version {version}")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown handoff kind {kind}")
    if length != len(message) - HEADER_SIZE or length > MAX_HANDSHAKE_BYTES:
        raise ProtocolError(
            f"handoff length {length} does not match its {len(message) - HEADER_SIZE} data bytes"
        )
    if source >= MAX_PROCESSES or sent > length:
        raise ProtocolError("handoff source or sent count out of range")
    return Handoff(kind, source, sent, bytes(message[HEADER_SIZE:]))

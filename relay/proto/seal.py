"""Sealed record layer of tunnel protocol v2: every carrier byte is encrypted and authenticated.

On the wire a record is ``length:u32`` (big endian) followed by ``length`` bytes of AES-256-GCM
ciphertext, the 16-byte tag included; the plaintext holds 1..MAX_RECORD bytes. The nonce is four
zero bytes and the record's sequence number as u64 (big endian), counted from 0 in each direction
of each carrier, and the length bytes are the associated data. A reordered, replayed, dropped,
injected or altered record therefore fails authentication, and so does one from another carrier,
because each carrier derives its own keys from the nonces of its own HELLO exchange.

A stream cut exactly at a record boundary is not visible here: the frames inside carry the
offsets that catch it (FIN), and :attr:`Unsealer.mid_record` tells a cut inside a record.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from typing import Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.proto import ProtocolError
from relay.proto.hello import NONCE_SIZE

KEY_SIZE = 32
TAG_SIZE = 16
HEADER_SIZE = 4
OVERHEAD = HEADER_SIZE + TAG_SIZE
"""Wire bytes a record adds to its plaintext."""
MAX_RECORD = 65536
"""Largest plaintext of one record."""
SEQ_LIMIT = 2**64
"""Records one direction of a carrier may carry: the nonce has no room for more."""

_SEAL_LABEL = b"hpc-relay/2 seal "
_W2E = b"w2e"
_E2W = b"e2w"
_LENGTH = struct.Struct("!I")
_NONCE = struct.Struct("!4xQ")
_MIN_LENGTH = 1 + TAG_SIZE
_MAX_LENGTH = MAX_RECORD + TAG_SIZE

Chunk = Union[bytes, memoryview]


class SealError(ProtocolError):
    """A record is malformed or fails authentication, or a direction ran out of sequence numbers.

    Either way the carrier is unusable and must be closed.
    """


def derive_keys(session_key: bytes, worker_nonce: bytes, exit_nonce: bytes) -> tuple[bytes, bytes]:
    """Return (worker_to_exit_key, exit_to_worker_key) for one carrier.

    Each is HMAC-SHA256(session_key, b"hpc-relay/2 seal " + label + worker_nonce + exit_nonce)
    with label b"w2e" or b"e2w", the nonces being those of this carrier's own HELLO exchange.
    Test vector: session_key bytes(range(32)), worker_nonce bytes(range(32, 48)), exit_nonce
    bytes(range(48, 64)) give
    w2e 9ac017d11f49513ff429d2c0f0946f7988a1c33c26241d0936da7c39bcdb0801 and
    e2w 878539c074973705a91493358087963054e2dc9085db2592c88c59225b4989a4.
    """
    if len(worker_nonce) != NONCE_SIZE or len(exit_nonce) != NONCE_SIZE:
        raise ValueError(f"HELLO nonces must be {NONCE_SIZE} bytes")
    keys = []
    for label in (_W2E, _E2W):
        msg = _SEAL_LABEL + label + worker_nonce + exit_nonce
        keys.append(hmac.new(session_key, msg, hashlib.sha256).digest())
    return keys[0], keys[1]


def _aead(key: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise ValueError(f"seal key must be {KEY_SIZE} bytes")
    return AESGCM(key)


class Sealer:
    """Seals one direction of one carrier.

    ``_seq`` is the sequence number of the next record; tests set it near SEQ_LIMIT.
    """

    __slots__ = ("_aead", "_failed", "_seq")

    def __init__(self, key: bytes) -> None:
        self._aead = _aead(key)
        self._seq = 0
        self._failed = False

    @property
    def sequence(self) -> int:
        """Records sealed so far."""
        return self._seq

    def seal(self, chunks: Iterable[Chunk]) -> list[bytes]:
        """Seal ``chunks`` (in order, any sizes) into as few records as possible.

        Returns two elements per record, its 4 length bytes and then its ciphertext with the tag,
        so the ciphertext is never copied behind a header: ``b"".join(result)`` is the wire
        stream, and ``writelines(result)`` sends it. Empty pieces are skipped; no pieces give no
        records. A piece that fills a record on its own (64 KiB of a large read) is encrypted
        straight from the caller's buffer; smaller ones are joined into one record. Nothing is
        sealed when the records would exhaust the sequence numbers: that raises SealError, and
        so does every later call.
        """
        if self._failed:
            raise SealError("sealing refused: this direction has run out of sequence numbers")
        plains: list[Chunk] = []
        parts: list[Chunk] = []
        room = MAX_RECORD
        for chunk in chunks:
            n = len(chunk)
            if n < room:
                if n:
                    parts.append(chunk)
                    room -= n
                continue
            if n == room:
                parts.append(chunk)
            else:
                view = memoryview(chunk)
                parts.append(view[:room])
                pos = room
                while n - pos >= MAX_RECORD:
                    plains.append(_joined(parts))
                    parts = [view[pos : pos + MAX_RECORD]]
                    pos += MAX_RECORD
                if pos < n:
                    plains.append(_joined(parts))
                    parts = [view[pos:]]
                    room = MAX_RECORD - (n - pos)
                    continue
            plains.append(_joined(parts))
            parts = []
            room = MAX_RECORD
        if parts:
            plains.append(_joined(parts))
        seq = self._seq
        if seq + len(plains) > SEQ_LIMIT:
            self._failed = True
            raise SealError("sealing refused: this direction has run out of sequence numbers")
        out: list[bytes] = []
        encrypt = self._aead.encrypt
        for plain in plains:
            head = _LENGTH.pack(len(plain) + TAG_SIZE)
            out.append(head)
            out.append(encrypt(_NONCE.pack(seq), plain, head))
            seq += 1
        self._seq = seq
        return out


def _joined(parts: list[Chunk]) -> Chunk:
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Unsealer:
    """Opens one direction of one carrier: feed any split of the stream, get the same plaintexts.

    ``_seq`` is the sequence number of the next record; tests set it near SEQ_LIMIT.
    """

    __slots__ = ("_aead", "_body", "_error", "_head", "_length", "_seq")

    def __init__(self, key: bytes) -> None:
        self._aead = _aead(key)
        self._seq = 0
        self._head = bytearray()
        """Length bytes of the record in progress (all four once its body has begun)."""
        self._body: Optional[bytearray] = None
        """What has arrived of the body of the record in progress, ``_length`` bytes when whole."""
        self._length = 0
        self._error: Optional[str] = None

    @property
    def sequence(self) -> int:
        """Records opened so far."""
        return self._seq

    @property
    def mid_record(self) -> bool:
        """True while a record has started but not ended (a clean close must not cut one)."""
        return bool(self._head)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Return the plaintexts of all records completed by ``data``, in order.

        Records wholly inside ``data`` are decrypted straight from it; only a record split
        across calls is copied, once, into a buffer of its own. A bad length or a failed
        authentication raises SealError (the good records of the same call are dropped with it,
        as the carrier is closed), and so does every later call.
        """
        if self._error is not None:
            raise SealError(self._error)
        try:
            return self._feed(memoryview(data))
        except SealError as exc:
            self._error = f"input refused after an earlier error: {exc}"
            raise

    def _feed(self, view: memoryview) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        end = len(view)
        head = self._head
        if head:
            body = self._body
            if body is None:
                pos = min(HEADER_SIZE - len(head), end)
                head += view[:pos]
                if len(head) < HEADER_SIZE:
                    return out
                (length,) = _LENGTH.unpack(head)
                _check_length(length, self._seq)
                if end - pos < length:
                    self._body = bytearray(view[pos:])
                    self._length = length
                    return out
                out.append(self._open(view[pos : pos + length], head))
                pos += length
            else:
                take = min(self._length - len(body), end)
                body += view[:take]
                pos = take
                if len(body) < self._length:
                    return out
                out.append(self._open(body, head))
                self._body = None
            head.clear()
        while end - pos >= HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(view, pos)
            _check_length(length, self._seq)
            start = pos + HEADER_SIZE
            if end - start < length:
                head += view[pos:start]
                self._body = bytearray(view[start:])
                self._length = length
                return out
            out.append(self._open(view[start : start + length], view[pos:start]))
            pos = start + length
        if pos < end:
            head += view[pos:]
        return out

    def _open(self, body: Chunk | bytearray, head: Chunk | bytearray) -> bytes:
        seq = self._seq
        if seq >= SEQ_LIMIT:
            raise SealError("this direction has run out of sequence numbers")
        try:
            plain = self._aead.decrypt(_NONCE.pack(seq), body, head)
        except InvalidTag:
            raise SealError(
                f"record {seq} failed authentication (altered, reordered, replayed, "
                "or from another carrier)"
            ) from None
        self._seq = seq + 1
        return plain


def _check_length(length: int, seq: int) -> None:
    if not _MIN_LENGTH <= length <= _MAX_LENGTH:
        raise SealError(
            f"record {seq}: length {length} out of range "
            f"({_MIN_LENGTH}..{_MAX_LENGTH} bytes of ciphertext with tag)"
        )

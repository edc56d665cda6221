"""The worker's side of opening a carrier: greeting and HELLO in one flight.

A carrier starts a new session (HELLO signed with the key's secret) or joins one (signed with
the session key: a further carrier, or a resume after carriers died). After the exit's reply
the carrier speaks sealed multiplexed frames (relay.proto.session); no CONNECT is sent, the
destinations travel in OPEN frames.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto import socks5 as s5


class AuthFailed(ProtocolError):
    """The exit's HELLO reply did not carry a valid MAC: it does not hold our key."""


class Established(NamedTuple):
    """HELLO accepted: the carrier belongs to ``session_id`` from now on."""

    session_id: bytes
    session_key: bytes
    heartbeat_ms: int
    exit_time_ms: int
    worker_nonce: bytes
    exit_nonce: bytes
    """The nonces of this carrier's HELLO exchange: its sealing keys derive from them."""


class Refused(NamedTuple):
    """The exit refused the method or the HELLO (``status`` from :mod:`relay.proto.hello`)."""

    stage: str
    status: int


OpenerEvent = Union[Established, Refused]


class CarrierOpener:
    """Builds the first flight and checks the exit's answer.

    ``key`` is the key's secret for a new session, the session key to join ``session_id``.
    """

    def __init__(
        self,
        *,
        key: bytes,
        key_id: str,
        now_ms: int,
        nonce: bytes,
        heartbeat_ms: int,
        session_id: bytes = hl.NEW_SESSION,
    ) -> None:
        self._key = key
        self._nonce = nonce
        self.joins = session_id != hl.NEW_SESSION
        self._hello = hl.encode_hello(key, key_id, now_ms, nonce, session_id, 0, heartbeat_ms)
        self._hello_mac = self._hello[-hl.MAC_SIZE :]
        self._client = s5.Socks5Client({hl.METHOD_TUNNEL: hl.decode_reply})
        # Only the method choice and the HELLO reply are the handshake; frames may follow in
        # the same read and must not reach the SOCKS5 client.
        self._answer_left = 2 + hl.REPLY_SIZE
        self._after = b""
        self.established: Optional[Established] = None
        self._done = False

    def first_flight(self) -> bytes:
        return self._client.greeting(bytes((hl.METHOD_TUNNEL,))) + self._hello

    def receive(self, data: bytes) -> list[OpenerEvent]:
        """Feed the exit's bytes; at most one event (Established or Refused) ever."""
        if self._done:
            self._after += data
            return []
        head = data[: self._answer_left]
        self._after += data[self._answer_left :]
        self._answer_left -= len(head)
        for event in self._client.receive(head):
            if isinstance(event, s5.MethodSelected):
                if event.method != hl.METHOD_TUNNEL:
                    self._done = True
                    return [Refused("method", hl.BAD_AUTH)]
            elif isinstance(event, s5.SubNegotiation):
                reply = event.message
                assert isinstance(reply, hl.HelloReply)
                self._done = True
                if reply.status != hl.OK:
                    return [Refused("hello", reply.status)]
                if not hl.verify_reply(reply, self._key, self._hello_mac):
                    raise AuthFailed("exit's HELLO reply failed authentication (wrong secret?)")
                if self.joins:
                    skey = self._key
                else:
                    skey = hl.session_key(self._key, self._nonce, reply.nonce, reply.session_id)
                self.established = Established(
                    reply.session_id,
                    skey,
                    reply.heartbeat_ms,
                    reply.timestamp_ms,
                    self._nonce,
                    reply.nonce,
                )
                return [self.established]
        return []

    def trailing(self) -> bytes:
        """Bytes after the handshake: the first sealed frames."""
        data, self._after = self._after, b""
        return data

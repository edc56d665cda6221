"""The worker's side of opening a carrier: greeting, HELLO and CONNECT in one flight.

The worker does not wait for each answer before sending the next message, so a new stream
costs one round trip to the exit (plus the exit's connect to the destination).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto import socks5 as s5


class AuthFailed(ProtocolError):
    """The exit's HELLO reply did not carry a valid MAC: it does not hold our key."""


class Established(NamedTuple):
    """HELLO accepted; for a new session the CONNECT reply follows."""

    session_id: bytes
    session_key: bytes
    heartbeat_ms: int
    peer_offset: int
    exit_time_ms: int


class Refused(NamedTuple):
    """The exit refused the method or the HELLO (``status`` from :mod:`relay.proto.hello`)."""

    stage: str
    status: int


class Connected(NamedTuple):
    code: int
    host: str
    port: int


OpenerEvent = Union[Established, Refused, Connected]


class TunnelOpener:
    """Builds the first flight and checks the exit's answers.

    For a new session the key is the key's secret; for a resume it is the session key,
    and no CONNECT is sent (the exit already knows the destination).
    """

    def __init__(
        self,
        *,
        key: bytes,
        key_id: str,
        now_ms: int,
        nonce: bytes,
        heartbeat_ms: int,
        destination: Optional[tuple[str, int]] = None,
        session_id: bytes = hl.NEW_SESSION,
        recv_offset: int = 0,
    ) -> None:
        self._key = key
        self._nonce = nonce
        self._resume = session_id != hl.NEW_SESSION
        if self._resume == (destination is not None):
            raise ValueError("a new session needs a destination; a resume must not have one")
        self._hello = hl.encode_hello(
            key, key_id, now_ms, nonce, session_id, recv_offset, heartbeat_ms
        )
        self._hello_mac = self._hello[-hl.MAC_SIZE :]
        self._destination = destination
        self._client = s5.Socks5Client({hl.METHOD_TUNNEL: hl.decode_reply})
        # A resume ends with the HELLO reply, and the exit's replayed data may follow it in
        # the same read: only the method choice and the reply go to the SOCKS5 client, which
        # would otherwise try to parse the data as a CONNECT reply.
        self._answer_left = 2 + hl.REPLY_SIZE if self._resume else -1
        self._after = b""
        self.established: Optional[Established] = None

    def first_flight(self) -> bytes:
        flight = self._client.greeting(bytes((hl.METHOD_TUNNEL,))) + self._hello
        if self._destination is not None:
            host, port = self._destination
            flight += s5.Socks5Client.request(s5.CMD_CONNECT, host, port)
        return flight

    def receive(self, data: bytes) -> list[OpenerEvent]:
        out: list[OpenerEvent] = []
        if self._answer_left >= 0:
            self._after += data[self._answer_left :]
            data = data[: self._answer_left]
            self._answer_left -= len(data)
        for event in self._client.receive(data):
            if isinstance(event, s5.MethodSelected):
                if event.method != hl.METHOD_TUNNEL:
                    self._client.subnegotiation_failed()
                    out.append(Refused("method", hl.BAD_AUTH))
                    return out
            elif isinstance(event, s5.SubNegotiation):
                reply = event.message
                assert isinstance(reply, hl.HelloReply)
                if reply.status != hl.OK:
                    self._client.subnegotiation_failed()
                    out.append(Refused("hello", reply.status))
                    return out
                if not hl.verify_reply(reply, self._key, self._hello_mac):
                    raise AuthFailed("exit's HELLO reply failed authentication (wrong secret?)")
                if self._resume:
                    skey = self._key
                else:
                    skey = hl.session_key(self._key, self._nonce, reply.nonce, reply.session_id)
                self.established = Established(
                    reply.session_id,
                    skey,
                    reply.heartbeat_ms,
                    reply.recv_offset,
                    reply.timestamp_ms,
                )
                out.append(self.established)
                if self._resume:
                    return out
            elif isinstance(event, s5.Reply):
                out.append(Connected(event.code, event.host, event.port))
        return out

    @property
    def is_resume(self) -> bool:
        return self._resume

    def trailing(self) -> bytes:
        """Bytes after the handshake: the start of the data phase."""
        data = self._client.trailing() + self._after
        self._after = b""
        return data

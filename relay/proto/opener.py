"""The worker's side of opening a carrier: greeting, HELLO and CONNECT in one flight.

The worker does not wait for each answer before sending the next message, so a new stream
costs one round trip to the exit (plus the exit's connect to the destination).

A warm opener stops after the HELLO: its first flight is greeting, HELLO and a keep-warm;
more keep-warms follow while it waits, and :meth:`TunnelOpener.request` adds the CONNECT
when a stream comes (docs/PROTOCOL.md, section 3a).
"""

from __future__ import annotations

from collections import deque
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


class KeptWarm(NamedTuple):
    """The exit answered a keep-warm: ``code`` 0 means still warm; any other code is a
    refusal (limit, or an exit that does not know keep-warm) and the exit closes."""

    code: int
    rtt: float
    """Seconds from :meth:`TunnelOpener.keep_warm` (or the first flight) to the reply."""


OpenerEvent = Union[Established, Refused, Connected, KeptWarm]


class TunnelOpener:
    """Builds the first flight and checks the exit's answers.

    For a new session the key is the key's secret; for a resume it is the session key,
    and no CONNECT is sent (the exit already knows the destination). A ``warm`` opener has
    no destination yet: see :meth:`keep_warm` and :meth:`request`.
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
        warm: bool = False,
    ) -> None:
        self._key = key
        self._nonce = nonce
        self._resume = session_id != hl.NEW_SESSION
        if warm:
            if self._resume or destination is not None:
                raise ValueError("a warm opener is a new session without a destination yet")
        elif self._resume == (destination is not None):
            raise ValueError("a new session needs a destination; a resume must not have one")
        self._warm = warm
        # Send times of the keep-warms whose replies are due, oldest first; None stands for
        # the CONNECT, whose reply is the last one.
        self._due: deque[Optional[float]] = deque()
        self._requested = False
        self._ended = False  # refused, or the CONNECT reply arrived: no more requests
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

    def first_flight(self, now: float = 0.0) -> bytes:
        """Greeting and HELLO, then the CONNECT, or for a warm opener the first keep-warm
        (sent at ``now``)."""
        flight = self._client.greeting(bytes((hl.METHOD_TUNNEL,))) + self._hello
        if self._destination is not None:
            host, port = self._destination
            flight += s5.Socks5Client.request(s5.CMD_CONNECT, host, port)
        elif self._warm:
            self._due.append(now)
            flight += s5.KEEP_WARM
        return flight

    def keep_warm(self, now: float) -> bytes:
        """The next keep-warm request, sent at ``now`` (its reply reports the RTT)."""
        self._check_warm("keep_warm")
        self._next_request(now)
        return s5.KEEP_WARM

    def request(self, host: str, port: int) -> bytes:
        """The CONNECT for the stream that takes this warm carrier; no keep-warm after it."""
        self._check_warm("request")
        data = s5.Socks5Client.request(s5.CMD_CONNECT, host, port)
        self._next_request(None)
        self._requested = True
        return data

    def _check_warm(self, what: str) -> None:
        if not self._warm or (not self._due and self.established is None):
            raise RuntimeError(f"{what} needs a warm opener after its first flight")
        if self._requested or self._ended:
            raise RuntimeError(f"{what} after the CONNECT or a refusal")

    def _next_request(self, sent: Optional[float]) -> None:
        if not self._due:  # every reply so far arrived: the client waits for none
            self._client.expect_reply()
        self._due.append(sent)

    @property
    def is_warm(self) -> bool:
        return self._warm

    @property
    def usable(self) -> bool:
        """A warm opener can still take a CONNECT (not refused, no CONNECT yet)."""
        return self._warm and not self._requested and not self._ended

    def receive(self, data: bytes, now: float = 0.0) -> list[OpenerEvent]:
        """Feed the exit's bytes; ``now`` (same clock as :meth:`keep_warm`) times keep-warms."""
        out: list[OpenerEvent] = []
        if self._answer_left >= 0:
            self._after += data[self._answer_left :]
            data = data[: self._answer_left]
            self._answer_left -= len(data)
        if self._ended:
            self._after += data
            return out
        events = self._client.receive(data)
        while events:
            event = events.pop(0)
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
                if not self._warm:
                    out.append(Connected(event.code, event.host, event.port))
                    continue
                if not self._due:
                    raise ProtocolError("exit sent a reply to no request")
                sent = self._due.popleft()
                if sent is None:
                    self._ended = True
                    out.append(Connected(event.code, event.host, event.port))
                    return out
                if event.code != s5.SUCCEEDED:
                    self._ended = True
                    out.append(KeptWarm(event.code, 0.0))
                    return out
                if (event.host, event.port) != ("0.0.0.0", 0):
                    raise ProtocolError("keep-warm reply with an address other than 0.0.0.0:0")
                out.append(KeptWarm(event.code, max(0.0, now - sent)))
                if self._due:
                    self._client.expect_reply()
                    events.extend(self._client.receive())
        # Nothing is due: no byte may come before the next request.
        if self._warm and not self._due and self.established and self._client.trailing():
            raise ProtocolError("exit sent bytes while no reply was due")
        return out

    @property
    def is_resume(self) -> bool:
        return self._resume

    def trailing(self) -> bytes:
        """Bytes after the handshake: the start of the data phase."""
        data = self._client.trailing() + self._after
        self._after = b""
        return data

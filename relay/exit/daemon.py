"""relay-exit: a SOCKS5 server that speaks the tunnel method, authenticates every carrier,
multiplexes each worker's streams over its carriers and dials only what the destination
policy allows."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
from collections import Counter, OrderedDict
from typing import Any, Optional, Union

from relay.exit.connection import ExitConnection
from relay.exit.group import Group, GroupPlace, PlaintextRelay
from relay.exit.policy import Policy
from relay.exit.sessions import ExitMux
from relay.exit.settings import ExitSettings
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.daemon import Daemon
from relay.net.muxpump import MuxPump
from relay.net.pump import PROTOCOL_ERROR, RawPump
from relay.net.tlslink import TlsEngine, TlsLink
from relay.proto import handoff as ho
from relay.proto import hello as hl

log = logging.getLogger("relay.exit")


BUFFER_CHECK_INTERVAL = 0.25
"""Seconds between checks of all sessions' buffered bytes against --max-buffered."""


class RelayExit(Daemon):
    role = "exit"

    def __init__(
        self,
        settings: ExitSettings,
        metrics: Optional[Metrics] = None,
        place: Optional[GroupPlace] = None,
    ) -> None:
        super().__init__(metrics)
        self.settings = settings
        # One process of a --workers group: the channels to its siblings.
        self.group: Optional[Group] = Group(place, self.metrics) if place is not None else None
        self.guard = hl.ReplayGuard()
        self.handshakes = 0
        # Connections in their handshake that have not authenticated, oldest first: when
        # the handshakes are at their limit, a new connection closes the first of them.
        self.unauthenticated: dict[ExitConnection, None] = {}
        self.carriers = 0
        self.carriers_per_key: Counter[str] = Counter()
        # Streams per key, counted from the moment an OPEN passes the limits (so that
        # concurrent requests cannot all pass them) until the stream ends.
        self.streams_per_key: Counter[str] = Counter()
        self.opening = 0
        self.over_budget = False
        self.tls_relays: set[PlaintextRelay] = set()
        """TLS carriers of sessions a sibling owns, whose plaintext this process carries."""
        self._budget_task: Optional[asyncio.Future[None]] = None
        self.sessions: dict[bytes, ExitMux] = {}
        self.parked = 0
        self._expired: OrderedDict[bytes, None] = OrderedDict()
        self._stopping = False

    async def start(self) -> None:
        s = self.settings
        raise_nofile(s.max_streams + s.max_handshakes + s.max_carriers + 64)
        group = self.group
        await self._listen(
            self._accept,
            s.listen.host,
            s.listen.port if group is None else group.place.port,
            s.metrics.host if s.metrics is not None else None,
            s.metrics.port if s.metrics is not None else 0,
            reuse_port=group is not None,
            metrics_path=group.place.metrics_path if group is not None else "",
        )
        if group is not None:
            group.start(self._adopt)
        log.info(
            "listening",
            extra={
                "fields": {
                    "addr": format_hostport(*self.address),
                    "keys": len(s.secrets),
                    "rules": len(s.policy.rules),
                    "allow_plain": s.allow_plain,
                    "tls": s.tls_fingerprint if s.tls is not None else "off",
                }
            },
        )
        self._budget_task = asyncio.ensure_future(self._watch_buffers())

    def _accept(self) -> Any:
        """Protocol for a new connection: the handshake, wrapped in TLS when configured."""
        conn = ExitConnection(self)
        tls = self.settings.tls
        if tls is None:
            return conn
        return TlsLink(TlsEngine(tls, server_side=True), conn, eager=True)

    def _adopt(self, sock: socket.socket, handoff: ho.Handoff) -> None:
        """A sibling passed us a connection whose HELLO is ours: carry on with it."""
        draining = self._server is not None and not self._server.is_serving()
        if self._stopping or (draining and handoff.kind == ho.KIND_NEW):
            sock.close()  # stopping, or draining: no new sessions (joins still come in)
            return
        self.metrics.handoffs.labels(ho.KIND_NAMES[handoff.kind], "adopted").inc()
        loop = asyncio.get_running_loop()
        future = asyncio.ensure_future(
            loop.connect_accepted_socket(lambda: ExitConnection(self, handoff), sock)
        )
        future.add_done_callback(_adopt_done)

    def reload(
        self,
        keys: dict[str, bytes],
        policy: Policy,
        tls: Optional[ssl.SSLContext] = None,
        tls_fingerprint: str = "",
    ) -> None:
        """Swap keys and policy (and the TLS certificate) at once; sessions of a key that is
        gone are closed. Connections accepted from now on get the new certificate."""
        self.settings.secrets = keys
        self.settings.policy = policy
        if tls is not None and self.settings.tls is not None:
            self.settings.tls = tls
            self.settings.tls_fingerprint = tls_fingerprint
        elif (tls is None) != (self.settings.tls is None):
            log.warning("TLS switched on or off in the configuration: takes a restart")
        revoked_streams = 0
        for session in [m for m in self.sessions.values() if m.key_id not in keys]:
            revoked_streams += len(session.driver.pumps)
            session.end("key revoked")
        for pump in [p for p in self.pumps if isinstance(p, RawPump)]:
            if pump.info.key_id not in keys:
                revoked_streams += 1
                pump.lost(0, ConnectionAbortedError("key revoked"))
        log.info(
            "reloaded",
            extra={
                "fields": {
                    "keys": len(keys),
                    "rules": len(policy.rules),
                    "revoked_streams": revoked_streams,
                    "tls": self.settings.tls_fingerprint if self.settings.tls else "off",
                }
            },
        )

    # -- limits ---------------------------------------------------------------------------
    def handshake_started(self, conn: ExitConnection) -> bool:
        """Count a new connection's handshake; False if it must be refused at once.

        At the limit the oldest connection that has not authenticated yet makes room, so
        slow or silent clients cannot keep workers out.
        """
        self.handshakes += 1
        if self.handshakes > self.settings.max_handshakes:
            self.metrics.limit_hits.labels("handshakes").inc()
            victim = next(iter(self.unauthenticated), None)
            if victim is None:
                log.warning("too many handshakes in progress; refusing a connection")
                return False
            log.warning(
                "too many handshakes in progress; closing the oldest unauthenticated one",
                extra={"fields": {"peer": victim._peer(), "age": round(victim.age(), 3)}},
            )
            victim.evict()
        self.unauthenticated[conn] = None
        return True

    def carrier_full(self, key_id: str) -> Optional[str]:
        """The name of a full carrier limit, or None when one more carrier may join."""
        s = self.settings
        if self.carriers >= s.max_carriers:
            return "carriers"
        if self.carriers_per_key[key_id] >= s.max_carriers_per_key:
            return "carriers-per-key"
        return None

    def carrier_started(self, key_id: str) -> None:
        self.carriers += 1
        self.carriers_per_key[key_id] += 1

    def carrier_ended(self, key_id: str) -> None:
        self.carriers -= 1
        self.carriers_per_key[key_id] -= 1
        if self.carriers_per_key[key_id] <= 0:
            del self.carriers_per_key[key_id]

    def reserve_stream(self, key_id: str) -> Optional[str]:
        """Take a stream slot for ``key_id``; returns the name of a full limit instead."""
        s = self.settings
        if len(self.pumps) + self.opening >= s.max_streams:
            return "streams"
        if self.streams_per_key[key_id] >= s.max_streams_per_key:
            return "streams-per-key"
        self.opening += 1
        self.streams_per_key[key_id] += 1
        return None

    def stream_started(self) -> None:
        """A reserved slot became a stream (in ``pumps``; its key count stays)."""
        self.opening -= 1

    def release_stream(self, key_id: str) -> None:
        """A reserved slot was not used (the stream was refused or reset)."""
        self.opening -= 1
        self._key_done(key_id)

    def _key_done(self, key_id: str) -> None:
        self.streams_per_key[key_id] -= 1
        if self.streams_per_key[key_id] <= 0:
            del self.streams_per_key[key_id]

    async def _watch_buffers(self) -> None:
        while True:
            await asyncio.sleep(BUFFER_CHECK_INTERVAL)
            try:
                self.check_buffers()
            except Exception:  # a bug here must not end the watch for good
                log.exception("checking the buffer budget failed")

    def buffered(self) -> int:
        return sum(m.driver.session.buffered for m in self.sessions.values())

    def check_buffers(self) -> int:
        """Hold every stream's destination side while all sessions together buffer more
        than --max-buffered; let them read again below three quarters of it."""
        limit = self.settings.max_buffered
        total = self.buffered()
        self.metrics.replay_bytes.set(total)
        if total <= limit and not self.over_budget:
            return total
        pumps = [p for p in self.pumps if isinstance(p, MuxPump)]
        if total > limit:
            if not self.over_budget:
                self.over_budget = True
                self.metrics.limit_hits.labels("buffered").inc()
                log.warning(
                    "buffered bytes over --max-buffered; streams stop reading destinations"
                    " until workers acknowledge",
                    extra={"fields": {"buffered": total, "limit": limit}},
                )
            for pump in pumps:  # again each time: streams opened since are held too
                pump.hold_source(True)
        elif self.over_budget and total <= limit * 3 // 4:
            self.over_budget = False
            log.info(
                "buffered bytes back under --max-buffered; streams read again",
                extra={"fields": {"buffered": total, "limit": limit}},
            )
            for pump in pumps:
                pump.hold_source(False)
        return total

    # -- sessions -------------------------------------------------------------------------
    def park(self, session: ExitMux) -> bool:
        """Keep a session whose carriers all died for the worker to come back; False when
        too many are parked already (the session then ends)."""
        if self._stopping:
            return False
        if self.parked >= self.settings.max_parked:
            self.metrics.limit_hits.labels("parked").inc()
            log.warning("too many parked sessions; ending one whose carriers died")
            return False
        self.parked += 1
        self.metrics.parked.inc()
        return True

    def unparked(self) -> None:
        self.parked -= 1
        self.metrics.parked.dec()

    def forget(self, session: ExitMux) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        self._expired[session.session_id] = None
        while len(self._expired) > EXPIRED_REMEMBERED:
            self._expired.popitem(last=False)

    def was_expired(self, session_id: bytes) -> bool:
        return session_id in self._expired

    async def drain(self, timeout: float) -> None:
        """Stop accepting, ask every worker (GOAWAY) to open new streams elsewhere, and give
        the streams open here ``timeout`` seconds to finish."""
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions.values()):
            session.driver.session.goaway("exit draining")
        await super().drain(timeout)

    async def stop(self) -> None:
        self._stopping = True
        if self.group is not None:
            self.group.close()
        if self._budget_task is not None:
            self._budget_task.cancel()
        for session in list(self.sessions.values()):
            session.end("exit stopping")
        await super().stop()

    def stream_done(self, pump: Union[MuxPump, RawPump], result: str) -> None:
        if result == PROTOCOL_ERROR:
            self.metrics.protocol_errors.labels("stream").inc()
        if pump not in self.pumps:
            # Ended while the exit was still dialling (reset by the worker, or broken): its
            # slot is released where it was reserved, not here as well.
            return
        super().stream_done(pump, result)
        self._key_done(pump.info.key_id)


def _adopt_done(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("cannot adopt a handed-off connection: %s", future.exception())


EXPIRED_REMEMBERED = 10000
"""Ended sessions remembered, so a late resume is reported as expired, not unknown."""


def raise_nofile(wanted: int) -> int:
    """Raise the soft descriptor limit towards ``wanted`` (two per stream, one per handshake);
    a limit too low makes accept() fail under load instead of a counted refusal."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "descriptor limit below what the stream limits need; raise LimitNOFILE / ulimit -n",
            extra={"fields": {"nofile": soft, "needed": wanted}},
        )
    return int(soft)

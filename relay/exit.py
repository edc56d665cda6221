"""relay-exit: a SOCKS5 server that speaks the tunnel method, authenticates every carrier,
multiplexes each worker's streams over its carriers and dials only what the destination
policy allows."""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import resource
import socket
import ssl
import time
from collections import Counter, OrderedDict
from typing import Any, Optional, Union

from relay.addresses import format_hostport
from relay.daemon import Daemon
from relay.exitgroup import Group, GroupPlace, PlaintextRelay
from relay.metrics import Metrics
from relay.muxpump import MuxDriver, MuxPump
from relay.policy import Policy
from relay.proto import ProtocolError, seal
from relay.proto import handoff as ho
from relay.proto import hello as hl
from relay.proto import session as ms
from relay.proto import socks5 as s5
from relay.pump import PARK_EXPIRED, PROTOCOL_ERROR, PlainProtocol, RawPump, StreamInfo
from relay.secrets import load_keys
from relay.sockopts import set_keepalive, set_nodelay, set_notsent_lowat, transport_socket
from relay.tlslink import TlsEngine, TlsLink, cert_fingerprint, server_context

log = logging.getLogger("relay.exit")

MIN_HEARTBEAT_MS = 100
HANDSHAKE_BYTES_MAX = 512 * 1024
"""Most bytes a connection may send before its HELLO is done (or, for a plain SOCKS5 client,
its stream starts). A real first flight is under 1 KiB; this caps what one handshake can make
the exit buffer."""
BUFFER_CHECK_INTERVAL = 0.25
"""Seconds between checks of all sessions' buffered bytes against --max-buffered."""
CARRIER_NOTSENT_LOWAT = 128 * 1024
"""Unsent bytes a carrier socket may hold in the kernel: the queue below the fair scheduler
stays short, so a bulk stream delays another stream's frames by little."""


class ExitSettings:
    """The knobs the exit reads, so tests and the demo need not build a whole config."""

    def __init__(self, **kwargs: Any) -> None:
        self.listen_host: str = kwargs.pop("listen_host", "0.0.0.0")
        self.listen_port: int = kwargs.pop("listen_port", 80)
        self.keys: dict[str, bytes] = kwargs.pop("keys")
        self.policy: Policy = kwargs.pop("policy")
        self.allow_plain: bool = kwargs.pop("allow_plain", False)
        self.heartbeat: float = kwargs.pop("heartbeat", 25.0)
        self.heartbeat_misses: int = kwargs.pop("heartbeat_misses", 3)
        self.handshake_timeout: float = kwargs.pop("handshake_timeout", 10.0)
        self.connect_timeout: float = kwargs.pop("connect_timeout", 10.0)
        self.max_streams: int = kwargs.pop("max_streams", 50000)
        self.max_streams_per_key: int = kwargs.pop("max_streams_per_key", 20000)
        self.max_handshakes: int = kwargs.pop("max_handshakes", 1000)
        self.max_carriers: int = kwargs.pop("max_carriers", 2000)
        self.max_carriers_per_key: int = kwargs.pop("max_carriers_per_key", 200)
        self.max_buffered: int = kwargs.pop("max_buffered", 1 << 30)
        # TLS on the listener (None: plain TCP); the fingerprint is only logged.
        self.tls: Optional[ssl.SSLContext] = kwargs.pop("tls", None)
        self.tls_fingerprint: str = kwargs.pop("tls_fingerprint", "")
        self.tcp_keepalive: float = kwargs.pop("tcp_keepalive", 60.0)
        self.replay_buffer: int = kwargs.pop("replay_buffer", 4 * 1024 * 1024)
        self.resume_timeout: float = kwargs.pop("resume_timeout", 600.0)
        self.max_parked: int = kwargs.pop("max_parked", 10000)
        self.metrics_host: Optional[str] = kwargs.pop("metrics_host", None)
        self.metrics_port: int = kwargs.pop("metrics_port", 0)
        self.workers: int = kwargs.pop("workers", 1)
        if kwargs:
            raise TypeError(f"unknown exit settings: {', '.join(sorted(kwargs))}")

    @classmethod
    def from_config(cls, cfg: Any) -> ExitSettings:
        tls, tls_fingerprint = None, ""
        if cfg.tls_cert is not None:
            tls = server_context(cfg.tls_cert, cfg.tls_key)
            tls_fingerprint = cert_fingerprint(cfg.tls_cert)
        return cls(
            listen_host=cfg.listen.host,
            listen_port=cfg.listen.port,
            keys=load_keys(cfg.keys),
            policy=Policy(cfg.allow),
            allow_plain=cfg.allow_plain,
            heartbeat=cfg.heartbeat,
            heartbeat_misses=cfg.heartbeat_misses,
            handshake_timeout=cfg.handshake_timeout,
            connect_timeout=cfg.connect_timeout,
            max_streams=cfg.max_streams,
            max_streams_per_key=cfg.max_streams_per_key,
            max_handshakes=cfg.max_handshakes,
            max_carriers=cfg.max_carriers,
            max_carriers_per_key=cfg.max_carriers_per_key,
            max_buffered=cfg.max_buffered,
            tls=tls,
            tls_fingerprint=tls_fingerprint,
            tcp_keepalive=cfg.tcp_keepalive,
            replay_buffer=cfg.replay_buffer,
            resume_timeout=cfg.resume_timeout,
            max_parked=cfg.max_parked,
            metrics_host=cfg.metrics.host if cfg.metrics else None,
            metrics_port=cfg.metrics.port if cfg.metrics else 0,
            workers=cfg.workers,
        )

    def share(self, workers: int) -> ExitSettings:
        """The limits of one process of ``workers``: each its equal share (rounded up),
        so that the group together keeps about the configured totals."""
        for name in SHARED_LIMITS:
            total = getattr(self, name)
            setattr(self, name, -(-total // workers) if total > 0 else total)
        return self


SHARED_LIMITS = (
    "max_streams",
    "max_streams_per_key",
    "max_handshakes",
    "max_buffered",
    "max_parked",
    "max_carriers",
    "max_carriers_per_key",
)
"""The limits a --workers process enforces on its share: the configured value divided by N."""


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
            s.listen_host,
            s.listen_port if group is None else group.place.port,
            s.metrics_host,
            s.metrics_port,
            reuse_port=group is not None,
            metrics_path=group.place.metrics_path if group is not None else "",
        )
        if group is not None:
            group.start(self._adopt)
        log.info(
            "listening",
            extra={
                "fields": {
                    "addr": _fmt(self.address),
                    "keys": len(s.keys),
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
        self.settings.keys = keys
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


class ExitMux:
    """One worker's session: its carriers, its multiplexed streams and its parking."""

    def __init__(
        self, relay_exit: RelayExit, session_id: bytes, key_id: str, key: bytes, heartbeat: float
    ) -> None:
        self.exit = relay_exit
        self.session_id = session_id
        self.key_id = key_id
        self.key = key
        s = relay_exit.settings
        self.driver = MuxDriver.new_session(
            ms.EXIT,
            relay_exit.metrics,
            heartbeat=heartbeat,
            misses=s.heartbeat_misses,
            window=s.replay_buffer,
            resume_timeout=s.resume_timeout,
            on_open=self._on_open,
            on_link_lost=self._link_lost,
            on_resumed=self._resumed,
        )
        self.conns: dict[int, ExitConnection] = {}
        self._next_cid = 1
        self.parked_at: Optional[float] = None
        self._expiry: Optional[asyncio.TimerHandle] = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.ended = False
        relay_exit.sessions[session_id] = self

    def join(self, conn: ExitConnection, worker_nonce: bytes, exit_nonce: bytes) -> int:
        """A carrier joined (the first one, a further one, or a resume)."""
        assert conn.transport is not None
        cid = self._next_cid
        self._next_cid += 1
        self.conns[cid] = conn
        to_exit, to_worker = seal.derive_keys(self.key, worker_nonce, exit_nonce)
        gap = self._unpark()
        self.driver.add_link(
            cid, conn.transport, seal.Sealer(to_worker), seal.Unsealer(to_exit), b""
        )
        if gap is not None:
            log.info(
                "session resumed",
                extra={
                    "fields": {
                        "key": self.key_id,
                        "gap": round(gap, 3),
                        "streams": len(self.driver.pumps),
                    }
                },
            )
        return cid

    def _link_lost(self, cid: int, why: str) -> None:
        conn = self.conns.pop(cid, None)
        if conn is not None:
            conn.mux = None
            self.exit.carrier_ended(self.key_id)
            if conn.transport is not None and not conn.closed:
                conn.transport.abort()
        if self.conns or self.ended:
            return
        if not self.driver.pumps and not self.driver.session.streams:
            self.end("")  # nothing to come back for
            return
        if not self.exit.park(self):
            self.end("too many parked sessions")
            return
        self.parked_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.exit.settings.resume_timeout, self._expire)
        log.info(
            "session parked",
            extra={"fields": {"key": self.key_id, "streams": len(self.driver.pumps), "why": why}},
        )

    def _unpark(self) -> Optional[float]:
        if self.parked_at is None:
            return None
        gap = time.monotonic() - self.parked_at
        self.parked_at = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.exit.unparked()
        return gap

    def _expire(self) -> None:
        self._expiry = None
        self.exit.metrics.resumes.labels("expired").inc()
        timeout = self.exit.settings.resume_timeout
        self.end(f"no resume within {timeout:.0f}s", PARK_EXPIRED)

    def end(self, why: str, result: str = "shutdown") -> None:
        """The session is over: reset its streams, close its carriers."""
        if self.ended:
            return
        self.ended = True
        self._unpark()
        for task in self._tasks:
            task.cancel()
        conns = list(self.conns.values())
        self.conns.clear()
        for conn in conns:
            conn.mux = None
            self.exit.carrier_ended(self.key_id)
        self.driver.close(why or "session ended", result)
        self.exit.forget(self)

    def _resumed(self, sid: int, cid: int) -> None:
        """The worker moved a stream here from a lost carrier (one resume per stream)."""
        self.exit.metrics.resumes.labels("ok").inc()
        pump = self.driver.pumps.get(sid)
        if pump is not None:
            log.debug(
                "stream moved", extra={"fields": {"stream": pump.info.stream_id, "carrier": cid}}
            )

    # -- streams --------------------------------------------------------------------------
    def _on_open(self, sid: int, address: bytes) -> None:
        # The pump exists from now on, so that optimistic bytes arriving while the exit
        # dials are kept for the destination.
        info = StreamInfo(os.urandom(4).hex(), "?", self.key_id)
        pump = MuxPump(self.driver, sid, info, plain_is_client=False, on_done=self.exit.stream_done)
        task = asyncio.ensure_future(self._open(pump, address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, pump: MuxPump, code: int, result: str, dest: str, why: str) -> None:
        pump.discard()
        sid = pump.sid
        self.exit.metrics.streams.labels(result).inc()
        log.info(
            "stream refused",
            extra={
                "fields": {
                    "key": self.key_id,
                    "dest": dest,
                    "result": result,
                    "reason": why or s5.REPLY_NAMES.get(code, ""),
                }
            },
        )
        self.driver.session.answer(sid, code)

    async def _open(self, pump: MuxPump, address: bytes) -> None:
        relay_exit = self.exit
        sid = pump.sid
        started = time.monotonic()
        settings = relay_exit.settings
        try:
            host, port, atyp = s5.decode_address(address)
        except s5.Socks5Error as exc:
            relay_exit.metrics.protocol_errors.labels("open").inc()
            self._refuse(pump, exc.reply, "bad-address", "?", str(exc))
            return
        dest_name = _fmt((host, port))
        full = relay_exit.reserve_stream(self.key_id)
        if full is not None:
            relay_exit.metrics.limit_hits.labels(full).inc()
            why = "too many streams" if full == "streams" else "too many streams for this key"
            log.warning(
                "stream limit reached", extra={"fields": {"key": self.key_id, "limit": full}}
            )
            self._refuse(pump, s5.GENERAL_FAILURE, "limit", dest_name, why)
            return
        slot = True
        try:
            try:
                addresses = await resolve(relay_exit, host, port, atyp)
            except _Refusal as refusal:
                self._refuse(pump, refusal.code, refusal.result, dest_name, refusal.why)
                return
            dest, error = None, None
            loop = asyncio.get_running_loop()
            for candidate in addresses:
                try:
                    dest = await asyncio.wait_for(
                        loop.create_connection(PlainProtocol, candidate, port),
                        settings.connect_timeout,
                    )
                    break
                except (OSError, asyncio.TimeoutError) as exc:
                    error = exc
            if pump.done is not None or self.ended:
                if dest is not None:
                    dest[0].close()
                pump.discard()
                return  # the worker reset the stream while we dialled
            if self.key_id not in settings.keys:  # revoked by a reload while we connected
                if dest is not None:
                    dest[0].close()
                self._refuse(pump, s5.GENERAL_FAILURE, "revoked", dest_name, "key revoked")
                return
            if dest is None:
                code, why = _connect_error(error)
                self._refuse(pump, code, "connect-failed", dest_name, why)
                return
            transport, protocol = dest
            dest_sock = transport_socket(transport)
            set_keepalive(dest_sock, settings.tcp_keepalive)
            set_nodelay(dest_sock)
            bound = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
            info = pump.info
            info.destination = dest_name
            info.started = time.monotonic()
            relay_exit.pumps.add(pump)
            relay_exit.stream_started()
            slot = False
            pump.attach_plain(protocol)
            if relay_exit.over_budget:
                pump.hold_source(True)
            self.driver.session.answer(sid, s5.SUCCEEDED, s5.encode_address(*bound[:2]))
            relay_exit.metrics.handshake.observe(time.monotonic() - started)
            log.debug(
                "stream open",
                extra={"fields": {"stream": info.stream_id, "key": self.key_id, "dest": dest_name}},
            )
        finally:
            if slot:
                relay_exit.release_stream(self.key_id)
                pump.discard()


async def resolve(relay_exit: RelayExit, host: str, port: int, atyp: int) -> list[str]:
    """Resolve once, keep only addresses the policy allows; these are what gets dialled."""
    policy = relay_exit.settings.policy
    metrics = relay_exit.metrics
    if atyp != s5.ATYP_DOMAIN:
        decision = policy.check(host, port)
        if not decision.allowed:
            raise _denied(metrics, decision.reason)
        return [host]
    if not policy.may_allow_name(host, port):
        raise _denied(metrics, "no_rule")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
            relay_exit.settings.connect_timeout,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise _Refusal(s5.HOST_UNREACHABLE, "unresolved", f"cannot resolve: {exc}") from None
    allowed: list[str] = []
    first_reason = ""
    for info in infos:
        address = str(info[4][0])
        decision = policy.check(address, port, host)
        if decision.allowed:
            if address not in allowed:
                allowed.append(address)
        elif not first_reason:
            first_reason = decision.reason
    if not allowed:
        raise _denied(metrics, first_reason or "no_rule")
    return allowed


def _denied(metrics: Metrics, reason: str) -> _Refusal:
    metrics.policy_denials.labels(reason).inc()
    return _Refusal(s5.NOT_ALLOWED, "denied", f"policy: {reason}")


class ExitConnection(PlainProtocol):
    """One accepted connection: the handshake first, then a carrier of its worker's session
    (or, for an allowed plain SOCKS5 client, one side of a raw relay)."""

    def __init__(self, relay_exit: RelayExit, adopted: Optional[ho.Handoff] = None) -> None:
        super().__init__()
        self.exit = relay_exit
        self.metrics = relay_exit.metrics
        self.socks = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
        self.mux: Optional[ExitMux] = None
        self.cid = 0
        self.key_id = ""
        self.in_handshake = True
        self.started = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._task: Optional[asyncio.Future[None]] = None
        self._corked: Optional[list[bytes]] = None
        self._received = 0  # bytes received during the handshake
        # A --workers process keeps the handshake bytes until it knows whether the HELLO is
        # its own; a connection a sibling handed over is never handed on again.
        self.adopted = adopted
        self._raw: Optional[bytearray] = (
            bytearray() if relay_exit.group is not None and adopted is None else None
        )
        self._sent = 0  # handshake answer bytes written so far
        self._skip = adopted.sent if adopted is not None else 0  # the sibling wrote those

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        relay_exit = self.exit
        self.started = time.monotonic()
        relay_exit.connections.add(self)
        if not relay_exit.handshake_started(self):
            self._end_handshake()
            self.abort()
            return
        sock = transport_socket(transport)
        set_keepalive(sock, relay_exit.settings.tcp_keepalive)
        set_nodelay(sock)
        set_notsent_lowat(sock, CARRIER_NOTSENT_LOWAT)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(relay_exit.settings.handshake_timeout, self._timed_out)
        if self.adopted is not None:
            self.data_received(self.adopted.data)

    def data_received(self, data: bytes) -> None:
        if self.mux is not None:
            self.mux.driver.link_data(self.cid, data)
        elif self.in_handshake:
            self._received += len(data)
            if self._received > HANDSHAKE_BYTES_MAX:
                self.metrics.limit_hits.labels("handshake-bytes").inc()
                log.warning(
                    "too many bytes before the handshake ended; closing",
                    extra={"fields": {"peer": self._peer(), "bytes": self._received}},
                )
                self._end_handshake()
                self.abort()
                return
            if self._raw is not None:
                self._raw += data
            self._advance(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.mux is not None:
            self.mux.driver.drop_link(self.cid, "carrier closed by the worker")
            return False
        if self.in_handshake:
            self._fail("handshake", "peer closed during handshake")
            return False
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.exit.connections.discard(self)
        self._end_handshake()
        if self.mux is not None:
            self.mux.driver.drop_link(self.cid, str(exc) if exc else "carrier closed")
        elif not self.in_handshake and self._task is None:
            super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self.mux is not None:
            self.mux.driver.pause_link(self.cid)
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self.mux is not None:
            self.mux.driver.resume_link(self.cid)
        else:
            super().resume_writing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- handshake ------------------------------------------------------------------------
    def age(self) -> float:
        return time.monotonic() - self.started

    def evict(self) -> None:
        """Make room for a new connection: the handshake limit is reached (see RelayExit)."""
        self._end_handshake()
        self.abort()

    def tls_failed(self, exc: Exception) -> None:
        """The TLS layer gave up: no TLS from the client, a bad record, a closed connection."""
        if self.in_handshake:
            self._fail("tls", str(exc))
            return
        self.metrics.protocol_errors.labels("tls").inc()
        log.info(
            "TLS failed on a carrier", extra={"fields": {"peer": self._peer(), "why": str(exc)}}
        )
        # The link closes; connection_lost then moves the carrier's streams as for any loss.

    def _end_handshake(self) -> None:
        self.exit.unauthenticated.pop(self, None)
        if self.in_handshake:
            self.in_handshake = False
            self.exit.handshakes -= 1
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.metrics.protocol_errors.labels("handshake-timeout").inc()
        self.metrics.limit_hits.labels("handshake-timeout").inc()
        log.info("handshake timed out", extra={"fields": {"peer": self._peer()}})
        self._end_handshake()
        self.abort()

    def _fail(self, stage: str, why: str, reply: Optional[bytes] = None) -> None:
        self.metrics.protocol_errors.labels(stage).inc()
        log.info("handshake failed", extra={"fields": {"peer": self._peer(), "why": why}})
        self._close_with(reply)

    def _close_with(self, reply: Optional[bytes]) -> None:
        self._end_handshake()
        if self.transport is not None:
            if reply:
                self._write(reply)
            self._flush()
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None:
            data = self._unsent(data)
            self._sent += len(data)
            self.transport.write(data)

    def _unsent(self, data: bytes) -> bytes:
        """Leave out the answer bytes a sibling already wrote before handing us this
        connection (the method selection: the same bytes, as both parse the same greeting)."""
        if self._skip and data:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        return data

    def _flush(self) -> None:
        """Send the handshake answers held back so far, as one segment.

        The worker sends greeting, HELLO and CONNECT in one flight; answering all three in
        one segment matters because sshd relays to the worker without TCP_NODELAY: a second
        small segment would wait for the worker's delayed ACK, about 40 ms.
        """
        data = self._take_corked()
        if data and self.transport is not None:
            self._sent += len(data)
            self.transport.write(data)

    def _take_corked(self) -> bytes:
        corked, self._corked = self._corked, None
        return self._unsent(b"".join(corked)) if corked else b""

    def _peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        return _fmt(peer) if peer else "?"

    def _advance(self, data: bytes) -> None:
        if self._corked is None:  # else answers held for the CONNECT reply are still waiting
            self._corked = []
        try:
            events = self.socks.receive(data)
            while events and not self.closed:
                if not self._handle(events.pop(0)):
                    return
                events.extend(self.socks.receive())
        except s5.Socks5Error as exc:
            reply = self.socks.reply(exc.reply) if self.socks.state == "reply" else None
            self._fail("socks5", str(exc), reply)
        except ProtocolError as exc:
            self._fail("hello", str(exc))
        finally:
            if self._task is None:  # else the CONNECT reply joins them after the connect
                self._flush()

    def _handle(self, event: s5.Event) -> bool:
        assert self.transport is not None
        settings = self.exit.settings
        if isinstance(event, s5.Greeting):
            if hl.METHOD_TUNNEL in event.methods:
                self._write(self.socks.select_method(hl.METHOD_TUNNEL))
            elif settings.allow_plain and s5.USERPASS in event.methods:
                self._write(self.socks.select_method(s5.USERPASS))
            else:
                reason = "plain-refused" if s5.USERPASS in event.methods else "no-method"
                self.metrics.auth_failures.labels(reason).inc()
                log.info(
                    "no acceptable method",
                    extra={"fields": {"peer": self._peer(), "offered": event.methods.hex()}},
                )
                self._close_with(self.socks.select_method(s5.NO_ACCEPTABLE))
                return False
            return True
        if isinstance(event, s5.SubNegotiation):
            assert isinstance(event.message, hl.Hello)
            return self._on_hello(event.message)
        if isinstance(event, s5.UserPass):
            secret = settings.keys.get(event.username)
            ok = secret is not None and hmac.compare_digest(
                secret, event.password.encode("utf-8", "replace")
            )
            self._write(self.socks.auth_reply(ok))
            if not ok:
                self.metrics.auth_failures.labels("bad-password").inc()
                self._close_with(None)
                return False
            self.key_id = event.username
            self.exit.unauthenticated.pop(self, None)
            return True
        if isinstance(event, s5.Request):
            if event.command != s5.CMD_CONNECT:
                self._refuse_plain(s5.COMMAND_NOT_SUPPORTED, "command-not-supported", event)
                return False
            self.transport.pause_reading()
            self._task = asyncio.ensure_future(self._connect_plain_guarded(event))
            return False
        return False

    def _on_hello(self, hello: hl.Hello) -> bool:
        assert self.transport is not None
        settings = self.exit.settings
        if hello.is_resume:
            if self._hand_off(hello, ho.KIND_RESUME):
                return False
            return self._on_join(hello)
        secret = settings.keys.get(hello.key_id)
        if secret is None:
            return self._hello_refused(hello, hl.BAD_AUTH, "unknown-key")
        if not hl.verify_hello(hello, secret):
            return self._hello_refused(hello, hl.BAD_AUTH, "bad-mac")
        if self._hand_off(hello, ho.KIND_NEW):  # the nonce's process checks it for replay
            return False
        now_ms = int(time.time() * 1000)
        status = self.exit.guard.check(hello.timestamp_ms, hello.nonce, now_ms)
        if status != hl.OK:
            reason = {hl.CLOCK_SKEW: "clock-skew", hl.REPLAY: "replay"}.get(status, "busy")
            return self._hello_refused(hello, status, reason)
        if not self._carrier_room(hello):
            return False
        ours = int(settings.heartbeat * 1000)
        heartbeat_ms = max(MIN_HEARTBEAT_MS, min(ours, hello.heartbeat_ms or ours))
        group = self.exit.group
        session_id = group.new_session_id() if group is not None else os.urandom(16)
        nonce = os.urandom(hl.NONCE_SIZE)
        key = hl.session_key(secret, hello.nonce, nonce, session_id)
        self._write(
            hl.encode_reply(secret, hello.mac, hl.OK, session_id, 0, heartbeat_ms, nonce, now_ms)
        )
        mux = ExitMux(self.exit, session_id, hello.key_id, key, heartbeat_ms / 1000)
        log.info(
            "session open",
            extra={"fields": {"peer": self._peer(), "key": hello.key_id}},
        )
        self._start_carrier(mux, hello, nonce)
        return False

    def _on_join(self, hello: hl.Hello) -> bool:
        """A further carrier of a session, or a resume after its carriers died."""
        relay_exit = self.exit
        mux = relay_exit.sessions.get(hello.session_id)
        if mux is None or mux.ended:
            result = "expired" if relay_exit.was_expired(hello.session_id) else "unknown"
            self.metrics.resumes.labels(result).inc()
            return self._hello_refused(hello, hl.UNKNOWN_SESSION, f"resume-{result}")
        if mux.key_id != hello.key_id or not hl.verify_hello(hello, mux.key):
            self.metrics.resumes.labels("bad-auth").inc()
            return self._hello_refused(hello, hl.BAD_AUTH, "resume-bad-mac")
        now_ms = int(time.time() * 1000)
        status = relay_exit.guard.check(hello.timestamp_ms, hello.nonce, now_ms)
        if status != hl.OK:
            reason = {hl.CLOCK_SKEW: "clock-skew", hl.REPLAY: "replay"}.get(status, "busy")
            self.metrics.resumes.labels(reason).inc()
            return self._hello_refused(hello, status, f"resume-{reason}")
        if not self._carrier_room(hello):
            return False
        nonce = os.urandom(hl.NONCE_SIZE)
        heartbeat_ms = int(mux.driver.session.heartbeat * 1000)
        self._write(
            hl.encode_reply(
                mux.key, hello.mac, hl.OK, mux.session_id, 0, heartbeat_ms, nonce, now_ms
            )
        )
        self._start_carrier(mux, hello, nonce)
        return False

    def _carrier_room(self, hello: hl.Hello) -> bool:
        full = self.exit.carrier_full(hello.key_id)
        if full is None:
            return True
        self.metrics.limit_hits.labels(full).inc()
        log.warning(
            "carrier limit reached; refusing a HELLO",
            extra={"fields": {"key": hello.key_id, "limit": full, "peer": self._peer()}},
        )
        self._hello_refused(hello, hl.BUSY, full, auth_failure=False)
        return False

    def _start_carrier(self, mux: ExitMux, hello: hl.Hello, exit_nonce: bytes) -> None:
        """The HELLO is answered: from here on the connection is one of ``mux``'s carriers."""
        self.key_id = hello.key_id
        self.metrics.carrier_handshake.observe(time.monotonic() - self.started)
        self._end_handshake()
        self._flush()  # the method choice and the HELLO reply, in one segment
        self.exit.carrier_started(hello.key_id)
        self.mux = mux
        self.cid = mux.join(self, hello.nonce, exit_nonce)
        early = self.socks.trailing()
        if early and self.mux is not None:
            self.mux.driver.link_data(self.cid, early)

    def _hand_off(self, hello: hl.Hello, kind: int) -> bool:
        """Pass the connection to the sibling that owns this HELLO; False if it is ours."""
        group = self.exit.group
        if group is None or self._raw is None or self.transport is None:
            return False
        target = group.owner(hello.is_resume, hello.nonce, hello.session_id)
        if target == group.index:
            self._raw = None
            return False
        data, self._raw = bytes(self._raw), None
        transport = self.transport
        self._corked = None  # the owner answers the greeting again, unless it was sent
        self._end_handshake()
        transport.pause_reading()
        self.closed = True
        if isinstance(transport, TlsLink):
            # TLS stays here; the owner gets the plaintext over a local socket pair.
            ours, theirs = socket.socketpair()
            sent = group.send(target, kind, self._sent, data, theirs.fileno())
            theirs.close()
            if sent:
                relays = self.exit.tls_relays
                self.exit.connections.discard(self)
                relay = PlaintextRelay(transport, ours, lambda: relays.discard(relay))
                relays.add(relay)
            else:
                ours.close()
                transport.abort()
        else:
            sock = transport_socket(transport)
            if sock is not None:
                group.send(target, kind, self._sent, data, sock.fileno())
            # Our descriptor goes; the connection lives on in the owner (or, if the handoff
            # failed, it closes here and the failure is counted).
            transport.abort()
        log.debug(
            "handed off",
            extra={"fields": {"to": target, "kind": ho.KIND_NAMES[kind], "peer": self._peer()}},
        )
        return True

    def _hello_refused(
        self, hello: hl.Hello, status: int, reason: str, auth_failure: bool = True
    ) -> bool:
        """Answer the HELLO with a failure and close; a limit (``auth_failure`` False) is
        counted in relay_limit_hits_total only, as the HELLO itself was good."""
        if auth_failure:
            self.metrics.auth_failures.labels(reason).inc()
        log.info(
            "HELLO refused",
            extra={"fields": {"peer": self._peer(), "key": hello.key_id, "reason": reason}},
        )
        self.socks.subnegotiation_done(False)
        self._close_with(hl.encode_reply(None, hello.mac, status))
        return False

    def _refuse_plain(self, code: int, result: str, request: s5.Request, why: str = "") -> None:
        self.metrics.streams.labels(result).inc()
        log.info(
            "stream refused",
            extra={
                "fields": {
                    "peer": self._peer(),
                    "key": self.key_id,
                    "dest": _fmt((request.host, request.port)),
                    "result": result,
                    "reason": why or s5.REPLY_NAMES.get(code, ""),
                }
            },
        )
        self._close_with(self.socks.reply(code))

    async def _connect_plain_guarded(self, request: s5.Request) -> None:
        relay_exit = self.exit
        full = relay_exit.reserve_stream(self.key_id)
        if full is not None:
            self.metrics.limit_hits.labels(full).inc()
            self._refuse_plain(s5.GENERAL_FAILURE, "limit", request, "too many streams")
            return
        slot = True
        try:
            slot = not await self._connect_plain(request)
        except Exception:
            log.exception("stream set-up failed", extra={"fields": {"peer": self._peer()}})
            self.metrics.streams.labels("error").inc()
            self._end_handshake()
            self.abort()
        finally:
            if slot:
                relay_exit.release_stream(self.key_id)

    async def _connect_plain(self, request: s5.Request) -> bool:
        """A plain SOCKS5 client's CONNECT (``allow_plain``): relayed raw. True if started."""
        relay_exit = self.exit
        settings = relay_exit.settings
        try:
            addresses = await resolve(relay_exit, request.host, request.port, request.atyp)
        except _Refusal as refusal:
            if not self.closed:
                self._refuse_plain(refusal.code, refusal.result, request, refusal.why)
            return False
        dest, error = None, None
        loop = asyncio.get_running_loop()
        for address in addresses:
            try:
                dest = await asyncio.wait_for(
                    loop.create_connection(PlainProtocol, address, request.port),
                    settings.connect_timeout,
                )
                break
            except (OSError, asyncio.TimeoutError) as exc:
                error = exc
        if self.closed:
            if dest is not None:
                dest[0].close()
            return False
        if dest is None:
            code, why = _connect_error(error)
            self._refuse_plain(code, "connect-failed", request, why)
            return False
        transport, protocol = dest
        set_keepalive(transport_socket(transport), settings.tcp_keepalive)
        set_nodelay(transport_socket(transport))
        bound = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        assert self.transport is not None
        self._write(self.socks.reply(s5.SUCCEEDED, str(bound[0]), int(bound[1])))
        self._flush()
        self.metrics.handshake.observe(time.monotonic() - self.started)
        self._end_handshake()
        early = self.socks.trailing()
        info = StreamInfo(os.urandom(4).hex(), _fmt((request.host, request.port)), self.key_id)
        relay_exit.stream_started()
        raw = RawPump(info, self.metrics, on_done=relay_exit.stream_done)
        relay_exit.pumps.add(raw)
        if early:
            transport.write(early)
            info.up += len(early)
        self._task = None
        raw.attach(self, protocol)
        if self.transport is not None:
            self.transport.resume_reading()
        return True


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


class _Refusal(Exception):
    def __init__(self, code: int, result: str, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.result = result
        self.why = why


def _connect_error(error: Optional[BaseException]) -> tuple[int, str]:
    if isinstance(error, asyncio.TimeoutError):
        return s5.HOST_UNREACHABLE, "connect timed out"
    if isinstance(error, ConnectionRefusedError):
        return s5.CONNECTION_REFUSED, "connection refused"
    if isinstance(error, OSError):
        if error.errno == errno.ENETUNREACH:
            return s5.NETWORK_UNREACHABLE, "network unreachable"
        if error.errno == errno.EHOSTUNREACH:
            return s5.HOST_UNREACHABLE, "host unreachable"
        return s5.GENERAL_FAILURE, str(error)
    return s5.GENERAL_FAILURE, "no address to dial"


def _fmt(addr: Any) -> str:
    return format_hostport(addr[0], addr[1])

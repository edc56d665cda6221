"""Warm carriers: a few carriers per exit whose HELLO is done, waiting for a stream.

A new stream that finds a warm carrier for its exit sends only its CONNECT and waits for the
reply: no channel open, no HELLO. While it waits, a warm carrier sends a keep-warm every
agreed heartbeat interval (it crosses the same idle-killing firewalls as a stream) and is
dropped and replaced when the exit stops answering. See docs/PROTOCOL.md, section 3a.

The pool refills in the background, over the SSH connection the worker already has: it never
opens an SSH connection of its own (login nodes count logins), so after the SSH connection
is lost the pool waits until a stream has brought it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from relay.addresses import format_hostport
from relay.carrier import SshCarrier, TcpCarrier, TunnelRefused
from relay.loopbound import LoopBound
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.proto.opener import KeptWarm, OpenerEvent, TunnelOpener

if TYPE_CHECKING:
    from relay.worker import RelayWorker

log = logging.getLogger("relay.warm")

Carrier = Union[SshCarrier, TcpCarrier]

UNSUPPORTED_RETRY = 600.0
"""Seconds before asking again an exit that answered keep-warm with 07 (an older exit)."""
IDLE_RECHECK = 5.0
"""Seconds between looks at the SSH connection while the pool cannot refill."""


class WarmOpener(TunnelOpener):
    """The warm opener of one pool carrier: hands keep-warm replies to the pool, timed by
    the event loop's clock; the carrier sees the other events as for any new stream."""

    def __init__(self, on_kept: Callable[[KeptWarm], None], **kwargs: Any) -> None:
        super().__init__(warm=True, **kwargs)
        self._on_kept = on_kept

    def first_flight(self, now: float = 0.0) -> bytes:
        return super().first_flight(now or asyncio.get_running_loop().time())

    def receive(self, data: bytes, now: float = 0.0) -> list[OpenerEvent]:
        events = super().receive(data, now or asyncio.get_running_loop().time())
        rest: list[OpenerEvent] = []
        for event in events:
            if isinstance(event, KeptWarm):
                self._on_kept(event)
            else:
                rest.append(event)
        return rest


class WarmCarrier:
    """One pool carrier: opening (first keep-warm not answered yet), then ready."""

    def __init__(self, pool: WarmPool) -> None:
        self.pool = pool
        self.carrier: Optional[Carrier] = None
        self.opener: Optional[WarmOpener] = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.last_reply = loop.time()
        self.timer: Optional[asyncio.TimerHandle] = None

    @property
    def usable(self) -> bool:
        return (
            self.ready.done()
            and self.ready.result()
            and self.opener is not None
            and self.opener.usable
            and self.carrier is not None
            and not self.carrier.opened.done()
        )

    def send_connect(self, host: str, port: int) -> Carrier:
        """The stream's CONNECT on this carrier; its reply resolves ``carrier.opened``."""
        assert self.carrier is not None and self.opener is not None
        self.carrier.link.write(self.opener.request(host, port))
        return self.carrier

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.carrier is not None:
            self.carrier.link.close()
        if not self.ready.done():
            self.ready.set_result(False)


class WarmPool:
    """Up to ``size`` warm carriers to one exit."""

    _wake = LoopBound(asyncio.Event)

    def __init__(self, worker: RelayWorker, exit_addr: tuple[str, int], size: int) -> None:
        self.worker = worker
        self.exit = exit_addr
        self.size = size
        self.metrics = worker.metrics
        self.entries: list[WarmCarrier] = []
        self._task: Optional[asyncio.Future[None]] = None
        self._closed = False
        self._delay = 0.0

    # -- interface for the worker ---------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def kick(self) -> None:
        """Something changed (a carrier taken or lost, the SSH connection may be back)."""
        self._wake.set()

    def take(self) -> Optional[WarmCarrier]:
        """A ready warm carrier, now the caller's (it sends the CONNECT), or None."""
        for entry in self.entries:
            if entry.usable:
                self._remove(entry)
                if entry.timer is not None:
                    entry.timer.cancel()
                    entry.timer = None
                self.kick()
                return entry
        return None

    @property
    def ready(self) -> int:
        return sum(1 for e in self.entries if e.usable)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for entry in list(self.entries):
            self._remove(entry)
            entry.close()

    # -- refilling ------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closed:
            if self._delay > 0:
                await asyncio.sleep(self._delay)
            self._wake.clear()
            if len(self.entries) < self.size and self.worker.may_warm():
                try:
                    ok = await self._open_one()
                except Exception:  # a bug here must not end the refilling for good
                    log.exception("opening a warm carrier failed")
                    ok = False
                if ok:
                    self._delay = 0.0
                elif self._delay < UNSUPPORTED_RETRY:
                    self._delay = min(self.worker.settings.reconnect_max, max(1.0, self._delay * 2))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_RECHECK)

    async def _open_one(self) -> bool:
        """Open one carrier to the exit and wait until its first keep-warm is answered."""
        from relay.worker import OpenFailed

        s = self.worker.settings
        entry = WarmCarrier(self)
        try:
            carrier = await asyncio.wait_for(self.worker._dial(self.exit), s.connect_timeout)
        except (OpenFailed, asyncio.TimeoutError) as exc:
            self._failed(entry, "open-failed", str(exc) or "timed out")
            return False
        if self._closed:
            carrier.link.close()
            return True
        entry.carrier = carrier
        entry.opener = WarmOpener(
            lambda event: self._kept(entry, event),
            key=s.secret,
            key_id=s.key_id,
            now_ms=int(time.time() * 1000),
            nonce=os.urandom(hl.NONCE_SIZE),
            heartbeat_ms=int(s.heartbeat * 1000),
        )
        self.entries.append(entry)
        carrier.opened.add_done_callback(lambda fut: self._ended(entry, fut))
        carrier.start(entry.opener)
        try:
            return await asyncio.wait_for(asyncio.shield(entry.ready), s.connect_timeout)
        except asyncio.TimeoutError:
            self._failed(entry, "open-failed", "no answer to the first keep-warm")
            return False

    # -- events of one warm carrier -------------------------------------------------------
    def _kept(self, entry: WarmCarrier, event: KeptWarm) -> None:
        if event.code != s5.SUCCEEDED:
            if event.code == s5.COMMAND_NOT_SUPPORTED:
                self._delay = UNSUPPORTED_RETRY
                log.warning(
                    "exit does not support warm carriers; new streams dial instead",
                    extra={"fields": {"exit": format_hostport(*self.exit)}},
                )
                self._failed(entry, "unsupported", "keep-warm not supported")
            else:
                self._failed(entry, "refused", s5.REPLY_NAMES.get(event.code, str(event.code)))
            return
        loop = asyncio.get_running_loop()
        entry.last_reply = loop.time()
        if not entry.ready.done():
            entry.ready.set_result(True)
            self.metrics.warm_carriers.inc()
            self._schedule(entry)
        else:
            self.metrics.heartbeat_rtt.observe(event.rtt)

    def _schedule(self, entry: WarmCarrier) -> None:
        assert entry.opener is not None and entry.opener.established is not None
        interval = entry.opener.established.heartbeat_ms / 1000
        entry.timer = asyncio.get_running_loop().call_later(interval, self._tick, entry)

    def _tick(self, entry: WarmCarrier) -> None:
        """Time for a keep-warm, unless the replies to the earlier ones stopped coming."""
        entry.timer = None
        if entry not in self.entries or entry.carrier is None or entry.opener is None:
            return
        est = entry.opener.established
        assert est is not None
        loop = asyncio.get_running_loop()
        if loop.time() - entry.last_reply > est.heartbeat_ms / 1000 * self._misses():
            self._failed(entry, "missed", "no keep-warm reply in time")
            return
        entry.carrier.link.write(entry.opener.keep_warm(loop.time()))
        self._schedule(entry)

    def _misses(self) -> int:
        return int(self.worker.settings.heartbeat_misses)

    def _ended(self, entry: WarmCarrier, fut: asyncio.Future[Any]) -> None:
        """The carrier's handshake future finished: a loss, unless a stream took it."""
        exc = fut.exception() if not fut.cancelled() else None
        if entry not in self.entries:
            return
        if isinstance(exc, TunnelRefused):  # the exit refused our HELLO: as for a stream
            self.metrics.auth_failures.labels(f"exit-{exc.stage}").inc()
        reason = "lost" if entry.ready.done() and entry.ready.result() else "open-failed"
        self._failed(entry, reason, str(exc) if exc else "carrier closed")

    def _failed(self, entry: WarmCarrier, reason: str, why: str) -> None:
        self.metrics.keep_warm_failures.labels(reason).inc()
        log.debug(
            "warm carrier dropped",
            extra={"fields": {"exit": format_hostport(*self.exit), "reason": reason, "why": why}},
        )
        if entry in self.entries:
            self._remove(entry)
        entry.close()
        self.kick()

    def _remove(self, entry: WarmCarrier) -> None:
        if entry.ready.done() and entry.ready.result():
            self.metrics.warm_carriers.dec()
        self.entries.remove(entry)

"""The worker's session with one exit: its carriers kept open, resumed and replaced."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Callable, Optional, Protocol

from relay.errors import OpenFailed
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.backoff import Backoff
from relay.net.carrier import TunnelRefused
from relay.net.loopbound import LoopBound
from relay.net.muxpump import MuxDriver, MuxPump
from relay.net.pump import RESUME_FAILED, StreamInfo
from relay.net.sshhop import SshUnavailable
from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto import session as ms
from relay.proto.errors import RelayError
from relay.proto.opener import Established
from relay.worker.dialler import Carrier, Dialler
from relay.worker.settings import WorkerSettings

log = logging.getLogger("relay.worker")


class WorkerHost(Protocol):
    """What a session with an exit needs of its worker (relay.worker.daemon.RelayWorker)."""

    settings: WorkerSettings
    metrics: Metrics
    dialler: Dialler

    def stream_done(self, pump: MuxPump, result: str) -> None: ...


DEMAND_RETRY = 1.0
"""Seconds between carrier attempts that waiting clients may ask for (ExitClient.demand)."""


def next_place(taken: Collection[int], carriers: int, up: Callable[[int], bool]) -> int:
    """Which of the exit's ``carriers`` carrier places to fill next: the lowest free one
    whose SSH connection is up, else the lowest free one.

    Place k always rides SSH slot k mod N; the order only lets a live connection take a
    carrier at once while a dead one waits for its login budget.
    """
    free = [k for k in range(carriers) if k not in taken] or [len(taken)]
    return next((k for k in free if up(k)), free[0])


class SessionGone(RelayError):
    """The exit no longer has our session (restarted, or parked too long): start anew.

    ``code`` is the HELLO status that refused the join; ``reason`` the result of the
    session's streams, which are reset."""

    reason = RESUME_FAILED

    def __init__(self, why: str, status: int) -> None:
        super().__init__(why, code=status)


class ExitClient:
    """The worker's session with one exit: ``--carriers`` carriers kept open (new ones
    joining the session with its key), every stream of the worker multiplexed on them.

    When carriers die their streams move to the others at once; a replacement is dialled
    with backoff and jitter into the free place, on that place's SSH slot (the SSH hop caps
    new logins per login node). When none is left the streams wait, up to
    ``--resume-timeout``, for a carrier to come back.
    """

    ready = LoopBound(asyncio.Event)
    """Set while a carrier is up."""
    _wake = LoopBound(asyncio.Event)
    _demand = LoopBound(asyncio.Event)
    """Set when a local client waits for a stream while no carrier is up."""
    settled = LoopBound(asyncio.Event)
    """Set when a carrier attempt ends, well or not (clients waiting in pick_exit look again)."""

    def __init__(self, worker: WorkerHost, exit_addr: tuple[str, int]) -> None:
        self.worker = worker
        self.exit = exit_addr
        self.metrics = worker.metrics
        self.driver: Optional[MuxDriver] = None
        self.session_id = hl.NEW_SESSION
        self.session_key = b""
        self.carriers: dict[int, Carrier] = {}
        self.places: dict[int, int] = {}
        """Each carrier's place k (by carrier id): it rides SSH slot k mod --ssh-connections."""
        self._next_cid = 1
        self._task: Optional[asyncio.Future[None]] = None
        self.lost_at: Optional[float] = None
        """When the last carrier went; None while one is up."""
        self.failed_at = 0.0
        self.attempting = False
        """A carrier attempt is under way."""
        self.refused = False
        """The last attempt was refused by the exit (key, clock, limits): a configuration
        matter, retried only after --reconnect-max."""
        self.refusal: Optional[int] = None
        """The HELLO status of that refusal (None for the tunnel method)."""
        self.why = ""
        self._answers: dict[int, Callable[[int, bytes], None]] = {}
        self._old: list[MuxDriver] = []
        """Sessions the exit is draining: their streams finish, no new ones go there."""

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._keep_carriers())
        self._task.add_done_callback(self._keeper_ended)

    def _keeper_ended(self, task: asyncio.Future[None]) -> None:
        """A bug, not an outage: without this task the exit never gets a carrier again."""
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "carrier keeper failed; this exit gets no new carriers",
                exc_info=task.exception(),
                extra={"fields": {"exit": format_hostport(*self.exit)}},
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait, not wait_for: a cancel of close() itself must not be swallowed
            await asyncio.wait({self._task}, timeout=5)
        for driver in [*self._old, *([self.driver] if self.driver else [])]:
            driver.close("worker stopping")
        self.driver = None

    @property
    def usable(self) -> bool:
        return self.driver is not None and bool(self.carriers) and not self.driver.session.draining

    # -- carriers -------------------------------------------------------------------------
    async def _keep_carriers(self) -> None:
        s = self.worker.settings
        backoff = Backoff(0.25, 2.0, s.reconnect_max, jitter=(0.5, 1.0))
        while True:
            if len(self.carriers) >= s.carriers:
                await self._wake.wait()
                self._wake.clear()
                continue
            wait = 0.0
            self.attempting = True
            try:
                await self._add_carrier()
                backoff.reset()
                self.refused = False
                continue
            except SessionGone as exc:
                self._session_over(RESUME_FAILED, f"exit refused the resume: {exc}")
                continue
            except TunnelRefused as exc:
                # Refused by the exit (wrong key, clock, limits): a configuration matter that
                # a quick retry does not fix; try again at the longest backoff.
                self.why = str(exc)
                self.refused = True
                self.refusal = exc.status if exc.stage == "hello" else None
                wait = s.reconnect_max
            except OpenFailed as exc:
                self.why = str(exc)
                self.refused = False
                if isinstance(exc.__cause__, SshUnavailable):
                    wait = exc.__cause__.retry_after
            except (ProtocolError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
                self.why = str(exc) or type(exc).__name__
                self.refused = False
            except Exception as exc:
                # A bug, logged as one; the exit still gets carriers (its streams' resume
                # depends on them), so it counts as a failed attempt.
                log.error(
                    "carrier attempt failed unexpectedly",
                    exc_info=True,
                    extra={"fields": {"exit": format_hostport(*self.exit)}},
                )
                self.why = f"internal error: {exc!r}"
                self.refused = False
            finally:
                self.attempting = False
                self.settled.set()
            self.failed_at = time.monotonic()
            if (
                self.lost_at is not None
                and self.driver is not None
                and time.monotonic() - self.lost_at >= s.resume_timeout
            ):
                self.metrics.resumes.labels("gave-up").inc()
                self._session_over(
                    RESUME_FAILED, f"no carrier for {s.resume_timeout:.0f}s: {self.why}"
                )
            delay = max(backoff.next(), wait)
            if self.lost_at is not None:
                self.metrics.resumes.labels("retry").inc()
            log.debug(
                "carrier attempt failed",
                extra={
                    "fields": {
                        "exit": format_hostport(*self.exit),
                        "why": self.why,
                        "next": round(delay, 2),
                    }
                },
            )
            await self._back_off(delay)

    async def _back_off(self, seconds: float) -> None:
        """Wait between attempts; a client asking for a stream (demand()) ends the wait, so a
        key put back or a clock fixed is noticed at the next stream, not after up to
        --reconnect-max."""
        self._demand.clear()
        waiter = asyncio.ensure_future(self._demand.wait())
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()

    def demand(self) -> bool:
        """A client waits for a carrier: try again now if the last attempt failed (not
        refused) at least DEMAND_RETRY seconds ago, so waiting clients make one a second.
        True if an attempt is under way or asked for."""
        if self.attempting or self._demand.is_set():
            return True
        if (
            not self.carriers
            and not self.refused
            and time.monotonic() - self.failed_at >= DEMAND_RETRY
        ):
            self._demand.set()
            return True
        return False

    @property
    def down(self) -> bool:
        """No session and the last attempt failed: a new stream fails at once with ``why``
        instead of waiting (a session that lost its carriers waits for a resume)."""
        return self.driver is None and not self.attempting and self.failed_at > 0

    async def _add_carrier(self) -> None:
        joins = self.driver is not None
        session = (self.session_id, self.session_key) if joins else None
        dialler = self.worker.dialler
        place = next_place(self.places.values(), self.worker.settings.carriers, dialler.slot_up)
        try:
            carrier, est = await dialler.connect(self.exit, session, place=place)
        except TunnelRefused as exc:
            if joins and exc.status in (hl.UNKNOWN_SESSION, hl.BAD_AUTH):
                self.metrics.resumes.labels("refused").inc()
                raise SessionGone(str(exc), exc.status) from None
            log.warning(
                "exit refused a carrier",
                extra={"fields": {"exit": format_hostport(*self.exit), "why": str(exc)}},
            )
            raise
        if self.driver is None:
            self._new_session(est)
        assert self.driver is not None
        cid = self._next_cid
        self._next_cid += 1
        self.carriers[cid] = carrier
        self.places[cid] = place
        moved = self.driver.session.live_streams() if self.lost_at is not None else 0
        carrier.join(self.driver, cid, est)
        if cid in self.carriers:
            if self.lost_at is not None:
                gap = time.monotonic() - self.lost_at
                self.lost_at = None
                if moved:
                    self.metrics.resumes.labels("ok").inc(moved)
                log.info(
                    "session resumed",
                    extra={
                        "fields": {
                            "exit": format_hostport(*self.exit),
                            "gap": round(gap, 3),
                            "streams": moved,
                        }
                    },
                )
            self.ready.set()

    def _new_session(self, est: Established) -> None:
        s = self.worker.settings
        self.driver = MuxDriver.new_session(
            ms.WORKER,
            self.metrics,
            heartbeat=est.heartbeat_ms / 1000,
            misses=s.heartbeat_misses,
            window=s.replay_buffer,
            resume_timeout=s.resume_timeout,
            on_answer=self._answered,
            on_link_lost=self._link_lost,
            on_draining=self._draining,
        )
        self.session_id = est.session_id
        self.session_key = est.session_key
        log.info(
            "session open",
            extra={
                "fields": {
                    "exit": format_hostport(*self.exit),
                    "heartbeat": est.heartbeat_ms / 1000,
                }
            },
        )

    def _link_lost(self, cid: int, why: str) -> None:
        place = self.places.pop(cid, None)
        if self.carriers.pop(cid, None) is None:
            return
        self.metrics.reconnects.inc()
        streams = self.driver.session.live_streams() if self.driver is not None else 0
        log.info(
            "carrier lost",
            extra={
                "fields": {
                    "exit": format_hostport(*self.exit),
                    "carrier": cid,
                    "place": place,
                    "left": len(self.carriers),
                    "streams": streams,
                    "why": why,
                }
            },
        )
        if not self.carriers:
            self.lost_at = time.monotonic()
            self.ready.clear()
        elif self.driver is not None and self.driver.moved:
            self.metrics.resumes.labels("ok").inc(self.driver.moved)
        self._wake.set()

    def _draining(self, reason: str) -> None:
        """The exit is going away: finish this session's streams there, open new ones on
        a fresh session (to the same address: the exit's replacement)."""
        driver = self.driver
        if driver is None:
            return
        log.info(
            "exit draining; new streams go to a new session",
            extra={"fields": {"exit": format_hostport(*self.exit), "reason": reason}},
        )
        self._old.append(driver)
        driver._on_link_lost = lambda cid, why: self._old_link_lost(driver, why)
        self._forget_session()
        self._reap()

    def _old_link_lost(self, driver: MuxDriver, why: str) -> None:
        """A draining session lost its last carrier (the exit went before its streams
        ended): nothing resumes it, so its streams are reset instead of waiting forever."""
        if driver.links or driver not in self._old:
            return
        self._old.remove(driver)
        if driver.pumps:
            log.warning(
                "draining exit went away; resetting its streams",
                extra={
                    "fields": {
                        "exit": format_hostport(*self.exit),
                        "streams": len(driver.pumps),
                        "why": why,
                    }
                },
            )
        driver.close(f"exit went away while draining: {why}", RESUME_FAILED)

    def _forget_session(self) -> None:
        self.driver = None
        self.carriers = {}
        self.places = {}
        self.session_id = hl.NEW_SESSION
        self.session_key = b""
        self.lost_at = None
        self.ready.clear()
        self._wake.set()

    def _reap(self) -> None:
        for driver in list(self._old):
            if not driver.pumps:
                driver.close("drained")
                self._old.remove(driver)

    def _session_over(self, result: str, why: str) -> None:
        """The session cannot come back: reset its streams, start a new one."""
        driver = self.driver
        if driver is not None:
            log.warning(
                "session lost; resetting its streams",
                extra={"fields": {"exit": format_hostport(*self.exit), "why": why}},
            )
            driver.close(why, result)
        self._forget_session()

    # -- streams --------------------------------------------------------------------------
    def open(
        self, address: bytes, info: StreamInfo, answer: Callable[[int, bytes], None]
    ) -> MuxPump:
        """A new stream on this session; ``answer(code, bound)`` gets the exit's reply."""
        driver = self.driver
        assert driver is not None
        sid = driver.session.open(address)
        self._answers[sid] = answer
        return MuxPump(driver, sid, info, plain_is_client=True, on_done=self._stream_done)

    def _answered(self, sid: int, code: int, address: bytes) -> None:
        answer = self._answers.pop(sid, None)
        if answer is not None:
            answer(code, address)

    def _stream_done(self, pump: MuxPump, result: str) -> None:
        self._answers.pop(pump.sid, None)
        self.worker.stream_done(pump, result)
        if self._old:
            self._reap()

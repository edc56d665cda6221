"""A worker session and an exit session joined by simulated carriers, all in memory.

Carriers are byte queues that can be cut (everything in flight is lost, as with a black hole
or a reset) at any moment. Applications at both ends write known bytes and record what they
receive, so tests can check that every stream gets exactly the bytes that were sent.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

from relay.proto import session as ms

ADDRESS = b"\x03\x09collector\x25\x92"


def payload(sid: int, side: str, start: int, n: int) -> bytes:
    """Deterministic bytes, different per stream, side and offset."""
    seed = (sid * 7919 + (1 if side == "w" else 2) * 104729) & 0xFF
    return bytes((seed + i) & 0xFF for i in range(start, start + n))


class App:
    """One end's application side of one stream."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = bytearray()
        self.eof_sent = False
        self.eof_received = False
        self.reset: Optional[tuple[int, str]] = None
        self.finished = False
        self.answered: Optional[int] = None
        self.paused = False


class Sim:
    def __init__(
        self,
        *,
        window: int = 256 * 1024,
        heartbeat: float = 10.0,
        misses: int = 3,
        tombstone_ttl: float = 600.0,
        seed: int = 0,
        sealers: Optional[Callable[[int], tuple[object, object, object, object]]] = None,
        refuse: Callable[[int], int] = lambda sid: 0,
    ) -> None:
        self.now = 1000.0
        both = {"heartbeat": heartbeat, "misses": misses, "window": window}
        self.worker = ms.Session(ms.WORKER, now=self.now, tombstone_ttl=tombstone_ttl, **both)
        self.exit = ms.Session(ms.EXIT, now=self.now, tombstone_ttl=tombstone_ttl, **both)
        self.wire: dict[int, tuple[bytearray, bytearray]] = {}  # cid -> (to exit, to worker)
        self.wapps: dict[int, App] = {}
        self.eapps: dict[int, App] = {}
        self.rng = random.Random(seed)
        self._sealers = sealers
        self._next_cid = 1
        self.refuse = refuse
        self.exit_events: list[ms.Event] = []
        self.worker_events: list[ms.Event] = []

    # -- carriers -------------------------------------------------------------------------
    def add_carrier(self) -> int:
        cid = self._next_cid
        self._next_cid += 1
        self.wire[cid] = (bytearray(), bytearray())
        if self._sealers is not None:
            ws, wu, es, eu = self._sealers(cid)
        else:
            ws = wu = es = eu = None
        self.exit.add_carrier(cid, es, eu, self.now)
        self.worker.add_carrier(cid, ws, wu, self.now)
        return cid

    def cut(self, cid: int) -> None:
        """The carrier dies: bytes in flight are lost; both ends notice."""
        self.wire.pop(cid, None)
        self.worker.remove_carrier(cid, self.now)
        self.exit.remove_carrier(cid, self.now)

    # -- applications ---------------------------------------------------------------------
    def open(self) -> int:
        sid = self.worker.open(ADDRESS)
        self.wapps[sid] = App()
        return sid

    def write(self, side: str, sid: int, n: int) -> None:
        session, apps = (self.worker, self.wapps) if side == "w" else (self.exit, self.eapps)
        app = apps.get(sid)
        if app is None or app.eof_sent or app.reset or app.finished or n <= 0:
            return
        if side == "e" and app.answered is None:
            return
        if sid not in session.streams:
            return
        if app.paused:
            return
        data = payload(sid, side, app.sent, n)
        app.sent += n
        app.paused = session.send(sid, data)

    def eof(self, side: str, sid: int) -> None:
        session, apps = (self.worker, self.wapps) if side == "w" else (self.exit, self.eapps)
        app = apps.get(sid)
        if app is None or app.eof_sent or app.reset or app.finished:
            return
        if side == "e" and app.answered is None:
            return
        app.eof_sent = True
        session.send_fin(sid)

    def reset(self, side: str, sid: int) -> None:
        session, apps = (self.worker, self.wapps) if side == "w" else (self.exit, self.eapps)
        app = apps.get(sid)
        if app is None or app.reset or app.finished:
            return
        if side == "e" and app.answered is None:
            return
        app.reset = (-1, "local")
        session.reset(sid, 1, "application reset")

    # -- moving bytes ---------------------------------------------------------------------
    def flush(self, cid: int, budget: int = 1 << 30) -> None:
        """Move what both ends have to send on ``cid`` into the wire."""
        if cid not in self.wire:
            return
        to_exit, to_worker = self.wire[cid]
        for piece in self.worker.output(cid, self.now, budget):
            to_exit += piece
        for piece in self.exit.output(cid, self.now, budget):
            to_worker += piece

    def deliver(self, cid: int, max_bytes: Optional[int] = None) -> None:
        """Deliver (part of) what is in flight on ``cid``, in random splits."""
        if cid not in self.wire:
            return
        for direction in (0, 1):
            buf = self.wire[cid][direction]
            n = len(buf) if max_bytes is None else min(max_bytes, len(buf))
            chunk = bytes(buf[:n])
            del buf[:n]
            pos = 0
            while pos < len(chunk):
                step = self.rng.randint(1, max(1, len(chunk) - pos))
                piece = chunk[pos : pos + step]
                pos += step
                if direction == 0:
                    self._exit_events(self.exit.receive(cid, piece, self.now))
                else:
                    self._worker_events(self.worker.receive(cid, piece, self.now))
                if cid not in self.wire:
                    return

    def settle(self, rounds: int = 200) -> None:
        """Flush and deliver on every carrier until nothing moves."""
        for _ in range(rounds):
            moved = False
            for cid in list(self.wire):
                self.flush(cid)
                if any(self.wire[cid]):
                    moved = True
                    self.deliver(cid)
            if not moved:
                return
        raise AssertionError("the sessions never settled")

    def tick(self, dt: float) -> None:
        self.now += dt
        for dead in self.worker.tick(self.now):
            self.cut(dead)
        for dead in self.exit.tick(self.now):
            self.cut(dead)

    # -- events ---------------------------------------------------------------------------
    def _exit_events(self, events: list[ms.Event]) -> None:
        self.exit_events.extend(events)
        for ev in events:
            if isinstance(ev, ms.Opened):
                app = self.eapps[ev.stream] = App()
                code = self.refuse(ev.stream)
                app.answered = code
                self.exit.answer(ev.stream, code)
                if code:
                    app.reset = (code, "refused")
            else:
                self._common(self.eapps, ev)

    def _worker_events(self, events: list[ms.Event]) -> None:
        self.worker_events.extend(events)
        for ev in events:
            if isinstance(ev, ms.Answered):
                app = self.wapps[ev.stream]
                app.answered = ev.code
                if ev.code:
                    app.reset = (ev.code, "refused")
            else:
                self._common(self.wapps, ev)

    def _common(self, apps: dict[int, App], ev: ms.Event) -> None:
        if isinstance(ev, ms.Received):
            app = apps[ev.stream]
            assert not app.eof_received, "bytes after FIN"
            app.received += bytes(ev.payload)
        elif isinstance(ev, ms.Ended):
            apps[ev.stream].eof_received = True
        elif isinstance(ev, ms.Finished):
            apps[ev.stream].finished = True
        elif isinstance(ev, ms.Reset):
            apps[ev.stream].reset = (ev.code, ev.reason)
        elif isinstance(ev, ms.Writable):
            app = apps.get(ev.stream)
            if app is not None:
                app.paused = False

    # -- checks ---------------------------------------------------------------------------
    def check_prefixes(self) -> None:
        """What each application received is exactly the start of what the other sent."""
        for sid, wapp in self.wapps.items():
            eapp = self.eapps.get(sid)
            if eapp is not None:
                assert bytes(eapp.received) == payload(sid, "w", 0, len(eapp.received)), sid
                assert len(eapp.received) <= wapp.sent
                assert bytes(wapp.received) == payload(sid, "e", 0, len(wapp.received)), sid
                assert len(wapp.received) <= eapp.sent
            else:
                assert not wapp.received
        for session in (self.worker, self.exit):
            for stream in session.streams.values():
                limit = session.window
                assert 0 <= stream.sent - stream.acked <= limit, "credit below zero"
            held = sum(st.pending_len + st.sent - st.acked for st in session.streams.values())
            assert session.buffered == held, "buffer tally"

"""Tests for the data-phase state machine (:mod:`relay.proto.stream`).

Two :class:`TunnelStream` instances are wired back to back through an in-memory carrier whose
behaviour (chunking, interleaving, timer polls, cuts and reconnects) hypothesis controls.
"""

from __future__ import annotations

import random
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import frames as fr
from relay.proto.stream import Rtt, TunnelStream, WindowOpen

HB = 10.0
T0 = 1000.0
LIMIT = fr.MAX_DATA  # the smallest replay buffer allowed, so back-pressure is cheap to reach


def make(
    *, now: float = T0, limit: int = LIMIT, ack_every: Optional[int] = None, misses: int = 3
) -> TunnelStream:
    return TunnelStream(
        heartbeat=HB, now=now, misses=misses, replay_limit=limit, ack_every=ack_every
    )


def join(pieces: list) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def decode(wire: bytes) -> list[fr.Frame]:
    out = fr.FrameDecoder().feed(wire)
    return [fr.Data(bytes(f.payload)) if isinstance(f, fr.Data) else f for f in out]


# ---------------------------------------------------------------------------------------------
# the in-memory carrier


class Side:
    def __init__(self, name: str, stream: TunnelStream, outgoing: bytes) -> None:
        self.name = name
        self.stream = stream
        self.outgoing = outgoing
        """Everything this side's application sends, in order."""
        self.handed = 0
        """How much of it was handed to the stream."""
        self.received = bytearray()
        self.fins = 0
        self.rtts: list[float] = []
        self.window_events = 0


class Harness:
    """Two streams and one carrier at a time; each direction is an in-order byte pipe."""

    def __init__(
        self, a_data: bytes, b_data: bytes, rng: random.Random, ack_every: Optional[int] = None
    ) -> None:
        self.now = T0
        self.rng = rng
        self.a = Side("a", make(ack_every=ack_every), a_data)
        self.b = Side("b", make(ack_every=ack_every), b_data)
        self.pipes = {"a": bytearray(), "b": bytearray()}  # keyed by the writing side
        self.up = True
        self.cuts = 0

    def side(self, name: str) -> Side:
        return self.a if name == "a" else self.b

    def peer(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def write(self, side: Side, pieces: list) -> None:
        if self.up:  # while the carrier is down, writes are lost
            for piece in pieces:
                self.pipes[side.name] += piece

    # -- actions --------------------------------------------------------------------------
    def send(self, side: Side, n: int) -> bool:
        """Send up to ``n`` more bytes, never more than the window allows."""
        n = min(n, len(side.outgoing) - side.handed, side.stream.window)
        if n <= 0:
            return False
        payload = side.outgoing[side.handed : side.handed + n]
        pieces = side.stream.send(payload, self.now)
        frames = decode(join(pieces))
        assert all(isinstance(f, fr.Data) for f in frames)
        assert b"".join(f.payload for f in frames) == payload  # type: ignore[union-attr]
        side.handed += n
        assert side.stream.send_offset == side.handed
        assert 0 <= side.stream.replay_bytes <= side.stream.replay_limit
        assert side.stream.window == side.stream.replay_limit - side.stream.replay_bytes
        self.write(side, pieces)
        return True

    def fin(self, side: Side) -> bool:
        if side.handed < len(side.outgoing) or side.stream.fin_sent:
            return False
        self.write(side, [side.stream.send_fin(self.now)])
        assert side.stream.send_fin(self.now) == b""  # idempotent
        return True

    def deliver(self, receiver: Side, n: int) -> bool:
        pipe = self.pipes[self.peer(receiver).name]
        chunk = bytes(pipe[:n])
        del pipe[:n]
        if not chunk:
            return False
        events, reply = receiver.stream.receive(chunk, self.now)
        for event in events:
            if isinstance(event, fr.Data):
                assert len(event.payload) > 0
                receiver.received += event.payload
            elif isinstance(event, fr.Fin):
                receiver.fins += 1
            elif isinstance(event, Rtt):
                assert 0 <= event.seconds <= self.now - T0 + 1e-6
                receiver.rtts.append(event.seconds)
            elif isinstance(event, WindowOpen):
                receiver.window_events += 1
                assert 0 < event.window <= receiver.stream.window
            else:
                raise AssertionError(f"unexpected event {event!r}")
        self.write(receiver, [reply])
        self.check()
        return True

    def tick(self, dt: float) -> None:
        self.now += dt
        for side in (self.a, self.b):
            self.write(side, [side.stream.poll(self.now)])

    def cut(self, keep_a: float, keep_b: float) -> None:
        """The carrier dies: a prefix of what is in flight still arrives, the rest is lost."""
        if not self.up:
            return
        keep = {
            "a": int(len(self.pipes["a"]) * keep_a),
            "b": int(len(self.pipes["b"]) * keep_b),
        }
        for name in self.rng.sample(["a", "b"], 2):
            del self.pipes[name][keep[name] :]
            receiver = self.peer(self.side(name))
            self.deliver(receiver, keep[name])
        self.up = False
        self.cuts += 1
        self.pipes = {"a": bytearray(), "b": bytearray()}

    def reconnect(self) -> None:
        """A new carrier; the HELLO exchange tells each side the other's received offset."""
        if self.up:
            return
        self.up = True
        offsets = {side.name: side.stream.recv_offset for side in (self.a, self.b)}
        for side in self.rng.sample([self.a, self.b], 2):
            stream = side.stream
            peer_offset = offsets[self.peer(side).name]
            pieces = stream.resume(peer_offset, self.now)
            assert stream.acked_offset == peer_offset
            assert stream.replay_bytes == stream.send_offset - peer_offset
            assert not stream.mid_frame
            self.write(side, pieces)

    # -- checks ---------------------------------------------------------------------------
    def check(self) -> None:
        for side in (self.a, self.b):
            peer = self.peer(side)
            got = bytes(side.received)
            assert peer.outgoing[: len(got)] == got, f"{side.name} got bytes out of order"
            assert side.stream.recv_offset == len(got)
            assert side.fins <= 1
            if side.fins:
                assert len(got) == len(peer.outgoing)
                assert side.stream.fin_received
            assert side.stream.replay_bytes <= side.stream.replay_limit
            assert side.stream.acked_offset <= len(peer.received)

    def drain(self) -> None:
        """Reconnect if needed, then send everything, FIN, and deliver until both finished."""
        self.reconnect()
        idle_ticks = 0
        for _ in range(100_000):
            progress = False
            for side in self.rng.sample([self.a, self.b], 2):
                progress |= self.send(side, len(side.outgoing))
                progress |= self.fin(side)
            for side in self.rng.sample([self.a, self.b], 2):
                pipe = self.pipes[self.peer(side).name]
                if pipe:
                    size = len(pipe)
                    n = self.rng.randint(1, 16) if self.rng.random() < 0.3 else size
                    progress |= self.deliver(side, self.rng.randint(1, max(1, min(n, size))))
            if progress:
                idle_ticks = 0
                continue
            if self.a.stream.finished and self.b.stream.finished:
                break
            idle_ticks += 1
            assert idle_ticks < 4, "stuck: no progress even after heartbeat polls"
            self.tick(HB)
        self.check()
        for side in (self.a, self.b):
            peer = self.peer(side)
            assert bytes(side.received) == peer.outgoing
            assert side.fins == 1
            assert side.stream.finished
            assert side.stream.replay_bytes == 0
            assert side.stream.acked_offset == side.stream.send_offset == len(side.outgoing)
            assert not side.stream.mid_frame

    def run(self, action: tuple) -> None:
        kind = action[0]
        if kind == "send":
            self.send(self.side(action[1]), action[2])
        elif kind == "deliver":
            self.deliver(self.side(action[1]), action[2])
        elif kind == "fin":
            self.fin(self.side(action[1]))
        elif kind == "tick":
            self.tick(action[1])
        elif kind == "cut":
            self.cut(action[1], action[2])
        elif kind == "reconnect":
            self.reconnect()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


sides = st.sampled_from(["a", "b"])
amounts = st.one_of(st.integers(1, 64), st.integers(1, 3 * fr.MAX_DATA // 2))
base_actions = [
    st.tuples(st.just("send"), sides, amounts),
    st.tuples(st.just("deliver"), sides, amounts),
    st.tuples(st.just("send"), sides, amounts),
    st.tuples(st.just("deliver"), sides, amounts),
    st.tuples(st.just("fin"), sides),
    st.tuples(st.just("tick"), st.floats(0, 2 * HB)),
]
resume_actions = [
    *base_actions,
    st.tuples(st.just("cut"), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("reconnect")),
]
sizes = st.one_of(st.integers(0, 3000), st.integers(0, 3 * LIMIT))


# ---------------------------------------------------------------------------------------------
# properties


@settings(max_examples=150, deadline=None)
@given(
    sizes,
    sizes,
    st.lists(st.one_of(*base_actions), min_size=20, max_size=100),
    st.integers(0, 2**32),
    st.sampled_from([None, 1, 1000]),
)
def test_bytes_arrive_in_order_and_both_sides_finish(
    a_size: int, b_size: int, actions: list, seed: int, ack_every: Optional[int]
) -> None:
    h = Harness(payload(seed, a_size), payload(seed + 1, b_size), random.Random(seed), ack_every)
    for action in actions:
        h.run(action)
        h.check()
    h.drain()
    for side in (h.a, h.b):
        if side.handed > LIMIT:  # more than one replay buffer went through: ACKs reopened it
            assert side.window_events > 0


@settings(max_examples=250, deadline=None)
@given(
    sizes,
    sizes,
    st.lists(st.one_of(*resume_actions), min_size=20, max_size=100),
    st.integers(0, 2**32),
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(0, 60),
)
def test_resume_after_cuts_delivers_everything_exactly_once(
    a_size: int,
    b_size: int,
    actions: list,
    seed: int,
    keep_a: float,
    keep_b: float,
    forced_cut_at: int,
) -> None:
    actions = list(actions)
    actions.insert(min(forced_cut_at, len(actions)), ("cut", keep_a, keep_b))
    h = Harness(payload(seed, a_size), payload(seed + 1, b_size), random.Random(seed))
    for action in actions:
        h.run(action)
        h.check()
    assert h.cuts >= 1
    h.drain()


@pytest.mark.parametrize("fin", [False, True])
def test_resume_cut_at_every_byte_position(fin: bool) -> None:
    """Exhaustive: the carrier dies after each possible prefix of a small flight."""
    data = bytes(range(256)) * 3
    for keep in range(2 * fr.HEADER_SIZE + len(data) + 40):
        h = Harness(data, b"reply", random.Random(keep))
        h.send(h.a, 300)
        h.send(h.a, len(data))
        h.send(h.b, 5)
        if fin:
            h.fin(h.a)
        total = len(h.pipes["a"])
        if keep > total:
            break
        h.deliver(h.b, keep)
        h.cut(0.0, 0.0)
        assert h.b.stream.recv_offset == min(
            len(data), max(0, keep - fr.HEADER_SIZE), max(300, keep - 2 * fr.HEADER_SIZE)
        )
        h.drain()


@settings(max_examples=40, deadline=None)
@given(st.integers(LIMIT + 1, 3 * LIMIT), st.integers(0, 2**32))
def test_window_back_pressure(size: int, seed: int) -> None:
    """A sender that sends only within its window never exceeds the replay limit."""
    rng = random.Random(seed)
    h = Harness(payload(seed, size), b"", rng)
    blocked = 0
    while h.a.handed < size:
        if h.a.stream.window == 0:
            blocked += 1
            before = h.a.stream.window
            while h.a.stream.window == before:
                assert h.pipes["a"] or h.pipes["b"], "window closed with nothing in flight"
                for side in rng.sample([h.a, h.b], 2):
                    pipe = h.pipes[h.peer(side).name]
                    if pipe:
                        h.deliver(side, rng.randint(1, len(pipe)))
            assert h.a.stream.window > 0
        h.send(h.a, rng.randint(1, 2 * fr.MAX_DATA))
        assert h.a.stream.replay_bytes <= LIMIT
    assert blocked >= 1
    h.drain()


# ---------------------------------------------------------------------------------------------
# outbound framing and the window


def test_send_frames_payload_and_splits_large_writes() -> None:
    s = make()
    assert s.send(b"", T0) == []
    pieces = s.send(b"hello", T0 + 1)
    assert join(pieces) == fr.encode(fr.Data(b"hello"))
    assert s.last_send == T0 + 1
    big = bytes(2 * fr.MAX_DATA + 5)
    pieces = s.send(big, T0 + 2)
    assert [len(p) for p in pieces] == [5, fr.MAX_DATA, 5, fr.MAX_DATA, 5, 5]
    assert decode(join(pieces)) == [
        fr.Data(bytes(fr.MAX_DATA)),
        fr.Data(bytes(fr.MAX_DATA)),
        fr.Data(bytes(5)),
    ]
    assert s.send_offset == 2 * fr.MAX_DATA + 10
    assert s.replay_bytes == s.send_offset


def test_window_closes_and_acks_reopen_it() -> None:
    a, b = make(limit=LIMIT), make(limit=LIMIT, ack_every=LIMIT)
    assert a.window == LIMIT
    wire = join(a.send(bytes(LIMIT), T0))
    assert a.window == 0
    events, reply = b.receive(wire[:1000], T0)
    assert reply == b""  # below ack_every: no ACK yet
    events, reply = b.receive(wire[1000:], T0)
    assert decode(reply) == [fr.Ack(LIMIT, False)]
    events, _ = a.receive(reply, T0)
    assert events == [WindowOpen(LIMIT)]
    assert a.window == LIMIT
    assert a.replay_bytes == 0


def test_partial_ack_trims_partially() -> None:
    a = make()
    a.send(b"abcdef", T0)
    a.send(b"ghij", T0)
    assert a.receive(fr.encode_ack(3), T0)[0] == [WindowOpen(LIMIT - 7)]
    assert a.receive(fr.encode_ack(3), T0)[0] == []  # duplicate ACK: nothing new
    assert a.receive(fr.encode_ack(2), T0)[0] == []  # stale ACK is ignored
    assert a.replay_bytes == 7
    assert decode(join(a.resume(3, T0))) == [fr.Data(b"def"), fr.Data(b"ghij")]


def test_ack_every_threshold() -> None:
    b = make(ack_every=1000)
    _, reply = b.receive(fr.encode(fr.Data(bytes(999))), T0)
    assert reply == b""
    _, reply = b.receive(fr.encode(fr.Data(b"x")), T0)
    assert decode(reply) == [fr.Ack(1000, False)]
    assert b.ack_sent_offset == 1000


def test_default_ack_every() -> None:
    assert make(limit=LIMIT).ack_every == 64 * 1024
    assert make(limit=8 * 1024 * 1024).ack_every == 2 * 1024 * 1024  # a quarter of the buffer


@pytest.mark.parametrize(
    "kwargs",
    [{"heartbeat": 0}, {"heartbeat": -1}, {"misses": 0}, {"replay_limit": fr.MAX_DATA - 1}],
)
def test_constructor_validation(kwargs: dict) -> None:
    args = {"heartbeat": HB, "now": T0, "misses": 3, "replay_limit": LIMIT}
    args.update(kwargs)
    with pytest.raises(ValueError):
        TunnelStream(**args)


def test_send_after_fin_is_an_error() -> None:
    a = make()
    a.send_fin(T0)
    with pytest.raises(RuntimeError):
        a.send(b"late", T0)


# ---------------------------------------------------------------------------------------------
# FIN and RST


def test_fin_both_ways_finishes_both() -> None:
    a, b = make(), make()
    wire_a = join(a.send(b"ping?", T0)) + a.send_fin(T0)
    assert not a.finished
    events, reply_b = b.receive(wire_a, T0)
    assert [type(e) for e in events] == [fr.Data, fr.Fin]
    assert events[1] == fr.Fin(5)
    assert decode(reply_b) == [fr.Ack(5, True)]
    assert b.fin_received and b.fin_ack_sent and not b.finished
    events, _ = a.receive(reply_b, T0)
    assert events == [WindowOpen(LIMIT)]
    assert a.fin_acked and not a.finished  # only one direction is closed
    wire_b = b.send_fin(T0)
    events, reply_a = a.receive(wire_b, T0)
    assert events == [fr.Fin(0)]
    assert a.finished
    b.receive(reply_a, T0)
    assert b.finished


def test_duplicate_fin_is_ignored() -> None:
    b = make()
    events, _ = b.receive(fr.encode_fin(0), T0)
    assert events == [fr.Fin(0)]
    events, reply = b.receive(fr.encode_fin(0), T0)
    assert events == []
    assert reply == b""


def test_reset_is_reported_and_stops_processing() -> None:
    a, b = make(), make()
    wire = a.send_reset(fr.RST_PEER_RESET, "connection reset by destination")
    assert a.reset_seen
    events, reply = b.receive(wire + fr.encode(fr.Data(b"ignored")), T0)
    assert events == [fr.Reset(fr.RST_PEER_RESET, "connection reset by destination")]
    assert b.reset_seen
    assert b.recv_offset == 0
    assert reply == b""


# ---------------------------------------------------------------------------------------------
# protocol violations


def test_data_after_fin() -> None:
    b = make()
    b.receive(fr.encode(fr.Data(b"abc")) + fr.encode_fin(3), T0)
    with pytest.raises(ProtocolError):
        b.receive(fr.encode(fr.Data(b"d")), T0)


@pytest.mark.parametrize("offset", [0, 2, 4, 2**63])
def test_fin_at_wrong_offset(offset: int) -> None:
    b = make()
    with pytest.raises(ProtocolError):
        b.receive(fr.encode(fr.Data(b"abc")) + fr.encode_fin(offset), T0)


@pytest.mark.parametrize("fin", [False, True])
def test_ack_beyond_sent(fin: bool) -> None:
    a = make()
    a.send(b"abc", T0)
    if fin:
        a.send_fin(T0)
    with pytest.raises(ProtocolError):
        a.receive(fr.encode_ack(4, fin), T0)


def test_ack_of_unsent_fin() -> None:
    a = make()
    a.send(b"abc", T0)
    with pytest.raises(ProtocolError):
        a.receive(fr.encode_ack(3, True), T0)


def test_ack_of_fin_at_wrong_offset() -> None:
    a = make()
    a.send(b"abc", T0)
    a.send_fin(T0)
    with pytest.raises(ProtocolError):
        a.receive(fr.encode_ack(2, True), T0)


def test_malformed_frames_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        make().receive(b"\x09\x00\x00\x00\x00", T0)


@pytest.mark.parametrize("peer_offset", [-1, 4, 100])
def test_resume_outside_replay_range(peer_offset: int) -> None:
    a = make()
    a.send(b"abc", T0)
    with pytest.raises(ProtocolError):
        a.resume(peer_offset, T0)


def test_resume_before_acked_offset_is_refused() -> None:
    a = make()
    a.send(b"abcdef", T0)
    a.receive(fr.encode_ack(4), T0)
    with pytest.raises(ProtocolError):
        a.resume(3, T0)
    assert decode(join(a.resume(4, T0))) == [fr.Data(b"ef")]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_random_carrier_bytes_raise_only_protocol_error(blob: bytes, cuts: list[int]) -> None:
    s = make()
    s.send(b"0123456789", T0)
    points = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
    try:
        for lo, hi in zip(points, points[1:]):
            s.receive(blob[lo:hi], T0)
    except ProtocolError:
        return
    assert 0 <= s.acked_offset <= s.send_offset


# ---------------------------------------------------------------------------------------------
# heartbeats and liveness


def test_ping_when_idle_pong_answers_and_rtt_is_measured() -> None:
    a, b = make(), make()
    assert a.deadline == T0 + HB
    assert a.poll(T0 + HB * 0.75 - 0.01) == b""  # at most one grid step (HB/4) early
    ping = a.poll(T0 + HB)
    assert decode(ping) == [fr.Ping(int((T0 + HB) * 1e6))]
    assert a.last_send == T0 + HB
    assert a.poll(T0 + HB + 1) == b""  # not again before another interval
    events, pong = b.receive(ping, T0 + HB + 0.25)
    assert events == []
    assert decode(pong) == [fr.Pong(int((T0 + HB) * 1e6))]
    assert b.last_send == T0 + HB + 0.25
    events, reply = a.receive(pong, T0 + HB + 0.5)
    assert events == [Rtt(pytest.approx(0.5))]
    assert reply == b""


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e6), st.floats(0.1, 100), st.floats(0, 1))
def test_timers_wake_on_a_shared_grid_never_after_the_deadline(
    start: float, heartbeat: float, elapsed: float
) -> None:
    """Idle streams started at different moments wake on the same grid points."""
    s = TunnelStream(heartbeat=heartbeat, now=start)
    now = start + elapsed * heartbeat
    wake = s.wake_at(now)
    assert wake <= s.deadline
    if wake < s.deadline:
        grid = heartbeat / 4
        assert wake > now
        assert abs(wake / grid - round(wake / grid)) < 1e-6
        assert s.deadline - wake <= grid + 1e-9
        assert s.poll(wake) != b""  # and what wakes on the grid does send its PING


def test_sending_data_postpones_the_ping() -> None:
    a = make()
    a.send(b"x", T0 + 6)
    assert a.poll(T0 + HB) == b""
    assert a.deadline == T0 + 6 + HB
    assert decode(a.poll(T0 + 6 + HB))[0] == fr.Ping(int((T0 + 6 + HB) * 1e6))


def test_poll_flushes_a_pending_ack() -> None:
    b = make()
    b.receive(fr.encode(fr.Data(b"abc")), T0 + 1)
    frames = decode(b.poll(T0 + HB))
    assert frames == [fr.Ack(3, False), fr.Ping(int((T0 + HB) * 1e6))]
    frames = decode(b.poll(T0 + 2 * HB))
    assert frames == [fr.Ping(int((T0 + 2 * HB) * 1e6))]  # nothing left to acknowledge


def test_pong_with_implausible_token_gives_no_rtt() -> None:
    a = make()
    events, _ = a.receive(fr.encode_pong(int((T0 + 5) * 1e6)), T0)  # from the future
    assert events == []
    events, _ = a.receive(fr.encode_pong(0), T0 + 5000)  # over an hour old
    assert events == []


@pytest.mark.parametrize("misses", [1, 3])
def test_dead_after_heartbeat_times_misses(misses: int) -> None:
    a = make(misses=misses)
    limit = HB * misses
    assert a.deadline == T0 + HB
    assert not a.is_dead(T0 + limit - 0.001)
    assert a.is_dead(T0 + limit)
    # Our own PINGs do not keep the carrier alive; only received frames do.
    a.poll(T0 + HB)
    assert a.is_dead(T0 + limit)
    a.receive(fr.encode_pong(0), T0 + limit - 1)
    assert not a.is_dead(T0 + 2 * limit - 1.001)
    assert a.is_dead(T0 + 2 * limit - 1)


def test_deadline_tracks_send_and_receive() -> None:
    a = make()
    a.send(b"x", T0 + 25)
    assert a.deadline == T0 + 3 * HB  # receive side is due first
    a.receive(fr.encode_pong(0), T0 + 26)
    assert a.deadline == T0 + 25 + HB


def test_resume_restarts_timers_and_replays_fin_and_fin_ack() -> None:
    a, b = make(), make()
    wire = join(a.send(b"abc", T0)) + a.send_fin(T0)
    b.receive(wire, T0)  # B got everything; its ACK(fin) is lost with the carrier
    assert b.fin_received
    now = T0 + 100
    pieces_a = a.resume(b.recv_offset, now)
    pieces_b = b.resume(a.recv_offset, now)
    assert decode(join(pieces_a)) == [fr.Fin(3)]
    assert decode(join(pieces_b)) == [fr.Ack(3, True)]
    assert not a.is_dead(now + 1) and a.deadline == now + HB
    events, _ = b.receive(join(pieces_a), now)
    assert events == []  # the FIN was already delivered
    events, _ = a.receive(join(pieces_b), now)
    assert events == [WindowOpen(LIMIT)] or events == []
    assert a.fin_acked

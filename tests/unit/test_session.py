"""The v2 session state machine, worker against exit in memory, under any interleaving of
application writes, half-closes, resets, partial deliveries, carrier deaths and new carriers."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.proto import mux
from relay.proto import session as ms
from tests.support.muxsim import ADDRESS, Sim, payload

EXAMPLES = int(os.environ.get("MUX_EXAMPLES", "300"))
"""Raise for a longer search (e.g. MUX_EXAMPLES=5000)."""

side = st.sampled_from(["w", "e"])
op = st.one_of(
    st.tuples(st.just("open")),
    st.tuples(st.just("write"), side, st.integers(0, 7), st.integers(1, 70_000)),
    st.tuples(st.just("eof"), side, st.integers(0, 7)),
    st.tuples(st.just("reset"), side, st.integers(0, 7)),
    st.tuples(st.just("ack"), side, st.integers(0, 7)),
    st.tuples(st.just("deliver"), st.integers(0, 3), st.integers(0, 100_000)),
    st.tuples(st.just("cut"), st.integers(0, 3)),
    st.tuples(st.just("add")),
    st.tuples(st.just("tick"), st.floats(0.1, 4.0)),
)


def run(ops: list[tuple], seed: int, refuse_every: int = 0) -> Sim:
    def refuse(sid: int) -> int:
        return 2 if refuse_every and sid % refuse_every == 0 else 0

    sim = Sim(window=128 * 1024, seed=seed, refuse=refuse)
    sim.add_carrier()
    for item in ops:
        name = item[0]
        sids = sorted(sim.wapps)
        if name == "open":
            sim.open()
        elif name in ("write", "eof", "reset", "ack") and sids:
            sid = sids[item[2] % len(sids)]
            if name == "ack":  # an early ACK (Session.ack_now), at any moment, from either end
                (sim.worker if item[1] == "w" else sim.exit).ack_now(sid)
            elif name == "write":
                sim.write(item[1], sid, item[3])
            elif name == "eof":
                sim.eof(item[1], sid)
            else:
                sim.reset(item[1], sid)
        elif name == "deliver" and sim.wire:
            cid = sorted(sim.wire)[item[1] % len(sim.wire)]
            sim.flush(cid)
            sim.deliver(cid, item[2])
        elif name == "cut" and sim.wire:
            sim.cut(sorted(sim.wire)[item[1] % len(sim.wire)])
        elif name == "add" and len(sim.wire) < 4:
            sim.add_carrier()
        elif name == "tick":
            sim.tick(item[1])
        sim.check_prefixes()
    return sim


def finish(sim: Sim) -> None:
    """Heal the carriers, close every stream cleanly and let everything settle."""
    if not sim.wire:
        sim.add_carrier()
    for _ in range(50):
        sim.settle()
        for sid in sorted(sim.wapps):
            for s in ("w", "e"):
                sim.write(s, sid, 1000)
                sim.eof(s, sid)
        sim.settle()
        sim.tick(1.0)
        sim.settle()
        if not sim.worker.streams and not sim.exit.streams:
            break
    sim.check_prefixes()


def check_outcome(sim: Sim) -> None:
    assert not sim.worker.streams, f"worker kept {list(sim.worker.streams)}"
    assert not sim.exit.streams, f"exit kept {list(sim.exit.streams)}"
    for sid, wapp in sim.wapps.items():
        eapp = sim.eapps.get(sid)
        clean = wapp.reset is None and (eapp is None or eapp.reset is None)
        if clean:
            assert eapp is not None
            assert wapp.finished and eapp.finished, sid
            assert bytes(eapp.received) == payload(sid, "w", 0, wapp.sent)
            assert bytes(wapp.received) == payload(sid, "e", 0, eapp.sent)
        else:
            # A reset on one side reaches the other, which never saw a clean end.
            assert not wapp.finished or wapp.reset is None
            assert wapp.reset is not None or wapp.finished
            if eapp is not None:
                assert eapp.reset is not None or eapp.finished


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=60), st.integers(0, 2**32))
def test_any_interleaving_delivers_each_byte_once_in_order(ops, seed):
    sim = run(ops, seed)
    finish(sim)
    check_outcome(sim)


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40), st.integers(0, 2**32))
def test_refused_streams_end_at_both_sides(ops, seed):
    sim = run([("open",), ("open",), ("open",), *ops], seed, refuse_every=2)
    finish(sim)
    check_outcome(sim)
    for sid, wapp in sim.wapps.items():
        if sid % 2 == 0 and wapp.answered is not None:
            assert wapp.answered == 2 and not wapp.received


def test_streams_move_to_another_carrier_with_nothing_lost():
    sim = Sim(window=64 * 1024)
    a = sim.add_carrier()
    b = sim.add_carrier()
    sids = [sim.open() for _ in range(6)]
    sim.settle()
    on_a = [s for s in sids if sim.worker.stream_carrier(s) == a]
    assert on_a and len(on_a) < len(sids), "streams spread over both carriers"
    for sid in sids:
        sim.write("w", sid, 50_000)
        sim.write("e", sid, 40_000)
    sim.flush(a)
    sim.flush(b)
    sim.deliver(a, 30_000)  # part of it arrives, the rest dies with the carrier
    sim.cut(a)
    assert all(sim.worker.stream_carrier(s) == b for s in sids)
    finish(sim)
    check_outcome(sim)
    resumed = [e for e in sim.exit_events if isinstance(e, ms.Resumed)]
    assert {e.stream for e in resumed} >= set(on_a)


def test_black_hole_is_detected_by_heartbeat_and_streams_continue():
    sim = Sim(heartbeat=2.0)
    a = sim.add_carrier()
    sid = sim.open()
    sim.settle()
    sim.write("w", sid, 10_000)
    sim.flush(a)
    sim.wire[a][0].clear()  # the firewall forgot the connection: bytes vanish
    dead_seen = False
    for _ in range(40):
        sim.now += 0.5
        if sim.worker.tick(sim.now):
            dead_seen = True
            break
        sim.flush(a)
        sim.wire[a][0].clear()
        sim.wire[a][1].clear()
    assert dead_seen
    sim.cut(a)
    sim.add_carrier()
    finish(sim)
    check_outcome(sim)


def test_stalled_stream_does_not_block_another():
    """Credit: an application that reads nothing stalls its own stream only."""
    sim = Sim(window=64 * 1024)
    sim.add_carrier()
    stalled, lively = sim.open(), sim.open()
    sim.settle()
    sim.exit.hold_acks(stalled, True)  # the destination's socket is full
    for _ in range(20):
        sim.write("w", stalled, 30_000)
        sim.settle()
    assert sim.wapps[stalled].paused
    assert len(sim.eapps[stalled].received) <= 64 * 1024
    sim.write("w", lively, 5)
    sim.settle()
    assert bytes(sim.eapps[lively].received) == payload(lively, "w", 0, 5)
    sim.exit.hold_acks(stalled, False)
    sim.settle()
    assert not sim.wapps[stalled].paused


def test_round_robin_bulk_delays_another_stream_by_one_frame_at_most():
    sim = Sim(window=4 * 1024 * 1024)
    cid = sim.add_carrier()
    bulk, small = sim.open(), sim.open()
    sim.settle()
    sim.write("w", bulk, 3 * 1024 * 1024)
    sim.write("w", small, 10)
    pieces = sim.worker.output(cid, sim.now, budget=1 << 30)
    frames = mux.FrameDecoder().feed(b"".join(bytes(p) for p in pieces))
    data = [f for f in frames if isinstance(f, mux.Data)]
    first_small = next(i for i, f in enumerate(data) if f.stream == small)
    assert first_small <= 1


def test_a_lone_bulk_stream_sends_large_frames_and_steps_down_while_another_waits():
    sim = Sim(window=4 * 1024 * 1024)
    cid = sim.add_carrier()
    bulk, small = sim.open(), sim.open()
    sim.settle()

    def data_frames() -> list[mux.Data]:
        pieces = sim.worker.output(cid, sim.now, budget=1 << 30)
        frames = mux.FrameDecoder().feed(b"".join(bytes(p) for p in pieces))
        return [f for f in frames if isinstance(f, mux.Data)]

    sim.write("w", bulk, 4 * mux.MAX_DATA)
    assert [(f.stream, len(f.payload)) for f in data_frames()] == [(bulk, mux.MAX_DATA)] * 4
    sim.write("w", bulk, 4 * mux.DATA_STEP)
    sim.write("w", small, 2 * mux.DATA_STEP + 10)
    sizes = [(f.stream, len(f.payload)) for f in data_frames()]
    assert sizes[:6] == [(bulk, mux.DATA_STEP), (small, mux.DATA_STEP)] * 2 + [
        (bulk, mux.DATA_STEP),
        (small, 10),
    ]
    assert sizes[6:] == [(bulk, mux.DATA_STEP)]  # alone again: the rest in one frame


def test_ack_now_sends_the_current_ack_at_once():
    sim = Sim()
    cid = sim.add_carrier()
    sid = sim.open()
    sim.settle()
    sim.write("e", sid, 100)
    sim.flush(cid)
    sim.deliver(cid)
    assert sim.worker.output(cid, sim.now) == []  # a small read waits for the tick
    assert sim.worker.ack_now(sid)
    frames = mux.FrameDecoder().feed(b"".join(bytes(p) for p in sim.worker.output(cid, sim.now)))
    assert [(type(f), f.stream, f.offset) for f in frames] == [(mux.Ack, sid, 100)]
    assert not sim.worker.ack_now(sid + 1000)  # no such stream: nothing to send
    finish(sim)
    check_outcome(sim)


def test_reset_of_an_unanswered_stream_is_answered_and_forgotten():
    sim = Sim()
    cid = sim.add_carrier()
    sid = sim.open()
    sim.write("w", sid, 100)
    sim.reset("w", sid)
    sim.settle()
    sim.tick(1.0)
    sim.settle()
    assert not sim.worker.streams and not sim.exit.streams
    assert sim.eapps[sid].reset is not None
    del cid


def test_goaway_refuses_new_streams_and_tells_the_worker():
    sim = Sim()
    sim.add_carrier()
    old = sim.open()
    sim.settle()
    sim.exit.goaway("restart")
    sim.settle()
    assert sim.worker.draining
    assert any(isinstance(e, ms.Draining) for e in sim.worker_events)
    new = sim.open()
    sim.settle()
    assert sim.wapps[new].reset is not None
    sim.write("w", old, 100)
    finish(sim)
    assert bytes(sim.eapps[old].received) == payload(old, "w", 0, sim.wapps[old].sent)


def test_open_address_is_checked():
    sim = Sim()
    sim.add_carrier()
    try:
        sim.worker.open(b"\x09bad")
    except Exception as exc:
        assert isinstance(exc, mux.ProtocolError)
    else:
        raise AssertionError("bad address accepted")
    assert ADDRESS

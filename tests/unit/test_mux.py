"""The v2 frame codec: test vectors (docs/PROTOCOL.md), any split, any garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError, mux

VECTORS = [
    (mux.Data(1, 0, b"hello"), "01000000010000000d000000000000000068656c6c6f"),
    (mux.Ack(1, 5, False), "0200000001000000090000000000000005" + "00"),
    (mux.Ack(1, 5, True), "0200000001000000090000000000000005" + "01"),
    (mux.Fin(1, 5), "03000000010000000800000000000000" + "05"),
    (mux.Reset(1, 1, "closed"), "040000000100000007" + "01" + "636c6f736564"),
    (
        mux.Open(1, b"\x03\x15collector.example.org\x25\x92"),
        "0500000001000000190315636f6c6c6563746f722e6578616d706c652e6f72672592",
    ),
    (mux.Reply(1, 0, b"\x01\xc6\x33\x64\x07\x25\x92"), "06000000010000000800" + "01c63364072592"),
    (mux.Sync(1, 7, True), "0700000001000000090000000000000007" + "01"),
    (mux.Ping(1700000000000000), "080000000000000008" + "00060a24181e4000"),
    (mux.Pong(1700000000000000), "090000000000000008" + "00060a24181e4000"),
    (mux.GoAway("drain"), "0a0000000000000005" + "647261696e"),
]


@pytest.mark.parametrize(("frame", "wire"), VECTORS)
def test_vectors(frame, wire):
    assert mux.encode(frame).hex() == wire
    (decoded,) = mux.FrameDecoder().feed(bytes.fromhex(wire))
    if isinstance(frame, mux.Data):
        got = (decoded.stream, decoded.offset, bytes(decoded.payload))
        assert got == (frame.stream, frame.offset, frame.payload)
    else:
        assert decoded == frame


frames = st.one_of(
    st.builds(
        mux.Data,
        st.integers(1, 2**32 - 1),
        st.integers(0, 2**40),
        st.binary(min_size=1, max_size=3000),
    ),
    st.builds(mux.Ack, st.integers(1, 9), st.integers(0, 2**63), st.booleans()),
    st.builds(mux.Fin, st.integers(1, 9), st.integers(0, 2**63)),
    st.builds(mux.Reset, st.integers(1, 9), st.integers(0, 255), st.text(max_size=50)),
    st.builds(mux.Sync, st.integers(1, 9), st.integers(0, 2**63), st.booleans()),
    st.builds(mux.Ping, st.integers(0, 2**64 - 1)),
    st.builds(mux.GoAway, st.text(max_size=40)),
    st.builds(mux.Open, st.integers(1, 9), st.just(b"\x01\x7f\0\0\x01\x00\x50")),
)


def _normal(items):
    """Join consecutive DATA pieces of one frame, so that any split compares equal."""
    merged = []
    for f in items:
        if isinstance(f, mux.Data):
            f = mux.Data(f.stream, f.offset, bytes(f.payload))
            last = merged[-1] if merged else None
            if (
                isinstance(last, mux.Data)
                and last.stream == f.stream
                and last.offset + len(last.payload) == f.offset
            ):
                merged[-1] = mux.Data(f.stream, last.offset, last.payload + f.payload)
                continue
        merged.append(f)
    return merged


@settings(max_examples=300)
@given(st.lists(frames, max_size=12), st.data())
def test_any_split_gives_the_same_frames(items, data):
    wire = b"".join(mux.encode(f) for f in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = mux.FrameDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[prev:cut])
        prev = cut
    assert _normal(got) == _normal(items)
    assert not decoder.mid_frame


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_give_only_protocol_errors(blob):
    decoder = mux.FrameDecoder()
    try:
        decoder.feed(blob)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decoder.feed(b"\0")


@pytest.mark.parametrize(
    "wire",
    [
        "ff0000000100000000",  # unknown type
        "080000000100000008" + "00" * 8,  # PING on a stream
        "010000000000000009" + "00" * 9,  # DATA on stream 0
        "010000000100000008" + "00" * 8,  # DATA without payload
        "0100000001" + "%08x" % (8 + mux.MAX_DATA + 1),  # DATA too long
        "050000000100000003" + "090000",  # OPEN with a bad address type
        "0700000001000000090000000000000000" + "02",  # SYNC with unknown flags
    ],
)
def test_bad_frames_are_protocol_errors(wire):
    with pytest.raises(ProtocolError):
        mux.FrameDecoder().feed(bytes.fromhex(wire))


def test_sealed_record_vector_of_docs_protocol():
    """docs/PROTOCOL.md section 10: session key -> the carrier's sealing keys -> the
    worker's first record, carrying the OPEN vector above."""
    from relay.proto import hello as hl
    from relay.proto import seal

    worker_nonce, exit_nonce = bytes(range(16)), bytes(range(32, 48))
    key = hl.session_key(b"k" * 32, worker_nonce, exit_nonce, bytes(range(16, 32)))
    assert key.hex() == "68fbbc37dcfd008a140c85fbbbf4cfa4a170a06698729d01f93009406f1037c1"
    to_exit, to_worker = seal.derive_keys(key, worker_nonce, exit_nonce)
    assert to_exit.hex() == "d9e745368000389f67311055c6937550b01a8177b1166451db63e5162ed09d31"
    assert to_worker.hex() == "89fdf4b4e6837dcd9fe85c1969c1b67f1b7955b89660e465d9a32c3af7cc8fc9"
    open_frame = mux.encode(mux.Open(1, b"\x03\x15collector.example.org\x25\x92"))
    record = b"".join(seal.Sealer(to_exit).seal([open_frame]))
    assert record.hex() == (
        "00000032731f16d342c68d3c52adb50d19be5fa2a79c5fd4c39b1d337f00b9e6843d93fa64abe831"
        "2f39fdc1bd92d005ae162a7f8811"
    )
    (plain,) = seal.Unsealer(to_exit).feed(record)
    assert mux.FrameDecoder().feed(plain) == [mux.Open(1, b"\x03\x15collector.example.org\x25\x92")]

"""Tests for the tunnel data-phase frame codec (:mod:`relay.proto.frames`)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import frames as fr

U64 = 2**64 - 1

# ---------------------------------------------------------------------------------------------
# helpers and strategies


def header(ftype: int, length: int) -> bytes:
    return struct.pack("!BI", ftype, length)


def feed_all(chunks: list[bytes]) -> list[fr.Frame]:
    dec = fr.FrameDecoder()
    out: list[fr.Frame] = []
    for chunk in chunks:
        out.extend(dec.feed(chunk))
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def reason_text() -> st.SearchStrategy[str]:
    """Reasons that survive the round trip unchanged (valid UTF-8, at most MAX_REASON bytes)."""
    return st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)), max_size=fr.MAX_REASON
    ).filter(lambda s: len(s.encode("utf-8")) <= fr.MAX_REASON)


payloads = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=1, max_size=2000),
    st.integers(1, 3).map(lambda n: bytes([n]) * (fr.MAX_DATA - 3 + n)),
)

frame_strategy = st.one_of(
    payloads.map(fr.Data),
    st.builds(fr.Ack, st.integers(0, U64), st.booleans()),
    st.builds(fr.Ping, st.integers(0, U64)),
    st.builds(fr.Pong, st.integers(0, U64)),
    st.builds(fr.Fin, st.integers(0, U64)),
    st.builds(fr.Reset, st.integers(0, 255), reason_text()),
)


def match_decoded(frames: list[fr.Frame], decoded: list[fr.Frame]) -> None:
    """``decoded`` is ``frames`` where each DATA frame may come as several non-empty pieces."""
    it = iter(decoded)
    for frame in frames:
        if isinstance(frame, fr.Data):
            got = b""
            while len(got) < len(frame.payload):
                piece = next(it)
                assert isinstance(piece, fr.Data)
                assert len(piece.payload) > 0
                got += bytes(piece.payload)
            assert got == frame.payload
        else:
            assert next(it) == frame
    assert next(it, None) is None


# ---------------------------------------------------------------------------------------------
# round trips and exact encodings


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (fr.Data(b"abc"), b"\x01\x00\x00\x00\x03abc"),
        (fr.Ack(5, False), b"\x02\x00\x00\x00\x09" + (5).to_bytes(8, "big") + b"\x00"),
        (fr.Ack(7, True), b"\x02\x00\x00\x00\x09" + (7).to_bytes(8, "big") + b"\x01"),
        (fr.Ping(0x0102030405060708), b"\x03\x00\x00\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08"),
        (fr.Pong(U64), b"\x04\x00\x00\x00\x08" + b"\xff" * 8),
        (fr.Fin(1 << 40), b"\x05\x00\x00\x00\x08" + (1 << 40).to_bytes(8, "big")),
        (fr.Reset(3, "timeout"), b"\x06\x00\x00\x00\x08\x03timeout"),
        (fr.Reset(0, ""), b"\x06\x00\x00\x00\x01\x00"),
    ],
)
def test_exact_encoding_and_round_trip(frame: fr.Frame, wire: bytes) -> None:
    assert fr.encode(frame) == wire
    dec = fr.FrameDecoder()
    assert dec.feed(wire) == [frame]
    assert not dec.mid_frame


def test_specific_encoders_match_generic() -> None:
    assert fr.encode_ack(9, True) == fr.encode(fr.Ack(9, True))
    assert fr.encode_ack(9) == fr.encode(fr.Ack(9, False))
    assert fr.encode_ping(1) == fr.encode(fr.Ping(1))
    assert fr.encode_pong(2) == fr.encode(fr.Pong(2))
    assert fr.encode_fin(3) == fr.encode(fr.Fin(3))
    assert fr.encode_reset(4, "x") == fr.encode(fr.Reset(4, "x"))
    assert fr.data_header(10) + b"0123456789" == fr.encode(fr.Data(b"0123456789"))
    assert fr.data_header(fr.MAX_DATA) == b"\x01" + fr.MAX_DATA.to_bytes(4, "big")


@settings(max_examples=200, deadline=None)
@given(frame_strategy)
def test_round_trip_every_frame_type(frame: fr.Frame) -> None:
    wire = fr.encode(frame)
    assert len(wire) == fr.HEADER_SIZE + struct.unpack("!I", wire[1:5])[0]
    decoded = fr.FrameDecoder().feed(wire)
    if isinstance(frame, fr.Data):
        assert len(decoded) == 1
        assert isinstance(decoded[0], fr.Data)
        assert bytes(decoded[0].payload) == frame.payload
    else:
        assert decoded == [frame]


def test_tokens_are_masked_to_64_bits() -> None:
    assert fr.FrameDecoder().feed(fr.encode_ping(-1)) == [fr.Ping(U64)]
    assert fr.FrameDecoder().feed(fr.encode_pong(2**64 + 5)) == [fr.Pong(5)]


def test_reset_code_masked_and_reason_truncated() -> None:
    wire = fr.encode_reset(0x1FF, "r" * 500)
    assert len(wire) == fr.HEADER_SIZE + 1 + fr.MAX_REASON
    assert fr.FrameDecoder().feed(wire) == [fr.Reset(0xFF, "r" * fr.MAX_REASON)]


def test_reset_reason_truncated_inside_a_multibyte_character_still_decodes() -> None:
    reason = "a" + "\u20ac" * 100  # 1 + 300 bytes; the cut at 200 splits a character
    wire = fr.encode_reset(1, reason)
    [frame] = fr.FrameDecoder().feed(wire)
    assert isinstance(frame, fr.Reset)
    assert frame.code == 1
    assert frame.reason.startswith("a" + "\u20ac" * 66)
    assert frame.reason.endswith("\ufffd")


def test_reset_reason_with_surrogates_is_encoded_not_raised() -> None:
    [frame] = fr.FrameDecoder().feed(fr.encode_reset(2, "bad\udcffreason"))
    assert isinstance(frame, fr.Reset)
    assert frame.reason == "bad?reason"


# ---------------------------------------------------------------------------------------------
# stream decoding under arbitrary splits


@settings(max_examples=150, deadline=None)
@given(
    st.lists(frame_strategy, max_size=12),
    st.lists(st.integers(0, 2**31), max_size=30),
)
def test_any_split_decodes_to_the_same_frames(frames: list[fr.Frame], cuts: list[int]) -> None:
    wire = b"".join(fr.encode(f) for f in frames)
    match_decoded(frames, feed_all(split_at(wire, cuts)))


@settings(max_examples=100, deadline=None)
@given(st.lists(frame_strategy, min_size=1, max_size=8))
def test_byte_by_byte_decoding(frames: list[fr.Frame]) -> None:
    small = [f for f in frames if not (isinstance(f, fr.Data) and len(f.payload) > 3000)]
    wire = b"".join(fr.encode(f) for f in small)
    match_decoded(small, feed_all([wire[i : i + 1] for i in range(len(wire))]))


def test_data_piece_per_chunk_without_waiting_for_the_frame() -> None:
    dec = fr.FrameDecoder()
    wire = fr.encode(fr.Data(b"0123456789"))
    first = dec.feed(wire[:8])
    assert [bytes(f.payload) for f in first if isinstance(f, fr.Data)] == [b"012"]
    assert dec.mid_frame
    rest = dec.feed(wire[8:] + fr.encode_ping(1))
    assert [bytes(rest[0].payload)] == [b"3456789"]  # type: ignore[union-attr]
    assert rest[1:] == [fr.Ping(1)]
    assert not dec.mid_frame


def test_memoryview_input_is_accepted() -> None:
    wire = fr.encode(fr.Data(b"hello")) + fr.encode_fin(5)
    out = fr.FrameDecoder().feed(memoryview(wire))  # type: ignore[arg-type]
    assert bytes(out[0].payload) == b"hello"  # type: ignore[union-attr]
    assert out[1] == fr.Fin(5)


@settings(max_examples=150, deadline=None)
@given(st.lists(frame_strategy, max_size=6), st.data())
def test_mid_frame_is_true_exactly_inside_a_frame(frames: list[fr.Frame], data) -> None:
    encoded = [fr.encode(f) for f in frames]
    wire = b"".join(encoded)
    boundaries = {0}
    pos = 0
    for e in encoded:
        pos += len(e)
        boundaries.add(pos)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    dec = fr.FrameDecoder()
    assert not dec.mid_frame
    prev = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        dec.feed(wire[prev:cut])
        prev = cut
        assert dec.mid_frame == (cut not in boundaries), cut
    assert not dec.mid_frame


# ---------------------------------------------------------------------------------------------
# limits and rejected input


@pytest.mark.parametrize("length", [0, fr.MAX_DATA + 1, 2**32 - 1])
def test_data_length_out_of_range_rejected(length: int) -> None:
    with pytest.raises(ProtocolError):
        fr.FrameDecoder().feed(header(fr.DATA, length))


def test_data_length_limits_accepted() -> None:
    dec = fr.FrameDecoder()
    assert dec.feed(header(fr.DATA, fr.MAX_DATA)) == []
    assert dec.mid_frame
    out = dec.feed(b"z" * fr.MAX_DATA)
    assert b"".join(bytes(f.payload) for f in out) == b"z" * fr.MAX_DATA  # type: ignore[union-attr]
    assert not dec.mid_frame
    assert bytes(fr.FrameDecoder().feed(header(fr.DATA, 1) + b"q")[0].payload) == b"q"  # type: ignore[union-attr]


def test_data_length_checked_as_soon_as_the_header_is_complete() -> None:
    dec = fr.FrameDecoder()
    bad = header(fr.DATA, fr.MAX_DATA + 1)
    assert dec.feed(bad[:4]) == []
    with pytest.raises(ProtocolError):
        dec.feed(bad[4:])


@pytest.mark.parametrize("length", [0, fr.MAX_REASON + 2, 1000])
def test_reset_length_out_of_range_rejected(length: int) -> None:
    with pytest.raises(ProtocolError):
        fr.FrameDecoder().feed(header(fr.RST, length) + b"\x00" * min(length, 300))


@pytest.mark.parametrize("length", [1, fr.MAX_REASON + 1])
def test_reset_length_limits_accepted(length: int) -> None:
    body = b"\x04" + b"s" * (length - 1)
    assert fr.FrameDecoder().feed(header(fr.RST, length) + body) == [
        fr.Reset(4, "s" * (length - 1))
    ]


@pytest.mark.parametrize(("ftype", "size"), [(fr.ACK, 9), (fr.PING, 8), (fr.PONG, 8), (fr.FIN, 8)])
@pytest.mark.parametrize("delta", [-8, -1, 1, 100])
def test_fixed_size_bodies_enforced(ftype: int, size: int, delta: int) -> None:
    with pytest.raises(ProtocolError):
        fr.FrameDecoder().feed(header(ftype, size + delta) + bytes(size + delta))


@pytest.mark.parametrize("ftype", [0x00, 0x07, 0x42, 0xFF])
def test_unknown_frame_type_rejected(ftype: int) -> None:
    with pytest.raises(ProtocolError):
        fr.FrameDecoder().feed(header(ftype, 8) + bytes(8))


@pytest.mark.parametrize("flags", [2, 3, 0x80, 0xFF])
def test_ack_unknown_flags_rejected(flags: int) -> None:
    with pytest.raises(ProtocolError):
        fr.FrameDecoder().feed(header(fr.ACK, 9) + bytes(8) + bytes([flags]))


def test_error_after_valid_frames_in_same_chunk() -> None:
    with pytest.raises(ProtocolError):
        fr.FrameDecoder().feed(fr.encode_ping(1) + header(0x09, 0))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 2**31), max_size=10))
def test_random_bytes_raise_only_protocol_error(blob: bytes, cuts: list[int]) -> None:
    dec = fr.FrameDecoder()
    try:
        for chunk in split_at(blob, cuts):
            for frame in dec.feed(chunk):
                assert isinstance(frame, (fr.Data, fr.Ack, fr.Ping, fr.Pong, fr.Fin, fr.Reset))
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(frame_strategy.filter(lambda f: not isinstance(f, fr.Data)), max_size=6),
    st.integers(0, 2**31),
    st.integers(0, 255),
    st.lists(st.integers(0, 2**31), max_size=6),
)
def test_corrupted_streams_raise_only_protocol_error(
    frames: list[fr.Frame], where: int, value: int, cuts: list[int]
) -> None:
    wire = bytearray(b"".join(fr.encode(f) for f in frames) + fr.encode(fr.Data(b"tail")))
    wire[where % len(wire)] = value
    with contextlib.suppress(ProtocolError):
        feed_all(split_at(bytes(wire), cuts))

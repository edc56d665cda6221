"""Tests for the sealed record layer of tunnel protocol v2 (:mod:`relay.proto.seal`)."""

from __future__ import annotations

import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import seal as sl

MAX = sl.MAX_RECORD
SESSION_KEY = bytes(range(32))
WORKER_NONCE = bytes(range(32, 48))
EXIT_NONCE = bytes(range(48, 64))
W2E, E2W = sl.derive_keys(SESSION_KEY, WORKER_NONCE, EXIT_NONCE)
# The same session, another carrier (its own HELLO exchange, so its own nonces).
OTHER_W2E, _ = sl.derive_keys(SESSION_KEY, bytes(16), EXIT_NONCE)

# ---------------------------------------------------------------------------------------------
# helpers and strategies


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(f"{seed}:{size}").randbytes(size)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def records(key: bytes, plains: list[bytes]) -> list[bytes]:
    """One record per plaintext (each at most MAX bytes), each as its complete wire bytes."""
    sealer = sl.Sealer(key)
    out = []
    for plain in plains:
        parts = sealer.seal([plain])
        assert len(parts) == 2
        out.append(b"".join(parts))
    return out


def unseal(key: bytes, chunks: list[bytes]) -> tuple[sl.Unsealer, list[bytes]]:
    unsealer = sl.Unsealer(key)
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(unsealer.feed(chunk))
    return unsealer, out


def expect_refused(key: bytes, chunks: list[bytes], good: list[bytes]) -> None:
    """Feeding ``chunks`` raises SealError, and what came out before is a prefix of ``good``."""
    unsealer = sl.Unsealer(key)
    got: list[bytes] = []
    with pytest.raises(sl.SealError):
        for chunk in chunks:
            got.extend(unsealer.feed(chunk))
    assert got == good[: len(got)]


piece_sizes = st.lists(
    st.one_of(
        st.integers(0, 40),
        st.integers(0, 3000),
        st.sampled_from([MAX - 1, MAX, MAX + 1, 2 * MAX, 3 * MAX + 5]),
    ),
    max_size=12,
)
cuts = st.lists(st.integers(0, 2**32), max_size=12)
small_plains = st.lists(st.integers(1, 300), min_size=2, max_size=6).map(
    lambda sizes: [payload(n, i) for i, n in enumerate(sizes)]
)

# ---------------------------------------------------------------------------------------------
# keys


def test_key_derivation_vector() -> None:
    assert W2E.hex() == "9ac017d11f49513ff429d2c0f0946f7988a1c33c26241d0936da7c39bcdb0801"
    assert E2W.hex() == "878539c074973705a91493358087963054e2dc9085db2592c88c59225b4989a4"


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
def test_keys_differ_by_direction_nonces_and_session(session_key: bytes, nonce: bytes) -> None:
    inputs = {
        (session_key, nonce, EXIT_NONCE),
        (session_key, WORKER_NONCE, EXIT_NONCE),
        (session_key, EXIT_NONCE, nonce),  # the nonces swapped, when nonce is WORKER_NONCE
        (session_key, WORKER_NONCE, nonce),
        (SESSION_KEY, nonce, EXIT_NONCE),
    }
    keys = [key for args in inputs for key in sl.derive_keys(*args)]
    assert all(len(key) == sl.KEY_SIZE for key in keys)
    assert len(set(keys)) == len(keys)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        sl.derive_keys(SESSION_KEY, bytes(15), EXIT_NONCE)
    with pytest.raises(ValueError):
        sl.derive_keys(SESSION_KEY, WORKER_NONCE, bytes(17))
    with pytest.raises(ValueError):
        sl.Sealer(bytes(16))
    with pytest.raises(ValueError):
        sl.Unsealer(bytes(31))


# ---------------------------------------------------------------------------------------------
# wire format and packing


def test_record_format_matches_spec() -> None:
    sealer = sl.Sealer(W2E)
    aead = AESGCM(W2E)
    for seq, plain in enumerate([b"a", payload(1000), payload(MAX)]):
        head, body = sealer.seal([plain])
        assert head == struct.pack("!I", len(plain) + 16)
        assert body == aead.encrypt(bytes(4) + seq.to_bytes(8, "big"), plain, head)
    assert sealer.sequence == 3


def test_nothing_seals_to_nothing() -> None:
    sealer = sl.Sealer(W2E)
    assert sealer.seal([]) == []
    assert sealer.seal([b"", memoryview(b"")]) == []
    assert sealer.sequence == 0


@settings(max_examples=60, deadline=None)
@given(piece_sizes, st.booleans())
def test_packs_into_fewest_records(sizes: list[int], as_views: bool) -> None:
    pieces = [payload(n, i) for i, n in enumerate(sizes)]
    total = sum(sizes)
    given_pieces: list[sl.Chunk] = [memoryview(p) if as_views else p for p in pieces]
    wire = sl.Sealer(W2E).seal(iter(given_pieces))
    assert len(wire) == 2 * -(-total // MAX)
    unsealer, plains = unseal(W2E, [b"".join(wire)])
    assert b"".join(plains) == b"".join(pieces)
    assert all(len(p) == MAX for p in plains[:-1])
    assert all(1 <= len(p) <= MAX for p in plains)
    assert unsealer.sequence == len(plains)
    assert not unsealer.mid_record


@settings(max_examples=80, deadline=None)
@given(st.lists(piece_sizes, min_size=1, max_size=4), cuts)
def test_any_split_unseals_to_the_same_bytes(calls: list[list[int]], cut: list[int]) -> None:
    sealer = sl.Sealer(E2W)
    wire = b""
    sent = b""
    for c, sizes in enumerate(calls):
        pieces = [payload(n, 100 * c + i) for i, n in enumerate(sizes)]
        sent += b"".join(pieces)
        wire += b"".join(sealer.seal(pieces))
    unsealer, plains = unseal(E2W, split_at(wire, cut))
    assert b"".join(plains) == sent
    assert not unsealer.mid_record


def test_byte_at_a_time_and_mid_record() -> None:
    plain = payload(MAX, 7)
    wire = b"".join(sl.Sealer(W2E).seal([plain, b"tail"]))
    unsealer = sl.Unsealer(W2E)
    out: list[bytes] = []
    for i in range(len(wire)):
        out.extend(unsealer.feed(wire[i : i + 1]))
        assert unsealer.mid_record == (i + 1 not in (MAX + sl.OVERHEAD, len(wire)))
    assert out == [plain, b"tail"]


def test_feed_accepts_bytearray_and_memoryview() -> None:
    wire = b"".join(sl.Sealer(W2E).seal([b"abc", payload(MAX)]))
    unsealer = sl.Unsealer(W2E)
    out = unsealer.feed(bytearray(wire[:100])) + unsealer.feed(memoryview(wire)[100:])
    assert b"".join(out) == b"abc" + payload(MAX)


# ---------------------------------------------------------------------------------------------
# tampering


@settings(max_examples=300, deadline=None)
@given(small_plains, st.data(), cuts)
def test_any_bit_flip_is_refused(plains: list[bytes], data: st.DataObject, cut: list[int]) -> None:
    recs = records(W2E, plains)
    wire = bytearray(b"".join(recs))
    bit = data.draw(st.integers(0, 8 * len(wire) - 1), label="bit")
    wire[bit // 8] ^= 1 << (bit % 8)
    starts = [sum(map(len, recs[:i])) for i in range(len(recs))]
    hit = max(i for i, s in enumerate(starts) if s <= bit // 8)
    in_length = bit // 8 - starts[hit] < sl.HEADER_SIZE
    unsealer = sl.Unsealer(W2E)
    got: list[bytes] = []
    try:
        for chunk in split_at(bytes(wire), cut):
            got.extend(unsealer.feed(chunk))
    except sl.SealError:
        pass
    else:
        # Only a longer length can leave the stream waiting for more; a close then cuts a record.
        assert in_length and unsealer.mid_record
    assert got == plains[: len(got)]
    assert len(got) <= hit


@settings(max_examples=150, deadline=None)
@given(small_plains, st.data())
def test_dropped_duplicated_reordered_or_spliced_records_are_refused(
    plains: list[bytes], data: st.DataObject
) -> None:
    recs = records(W2E, plains)
    n = len(recs)
    op = data.draw(
        st.sampled_from(["drop", "duplicate", "swap", "other-carrier", "other-direction", "inject"])
    )
    i = data.draw(st.integers(0, n - 1), label="i")
    if op == "drop":
        # Dropping the last records leaves a valid prefix: the FIN offsets catch that cut.
        i = min(i, n - 2)
        tampered = recs[:i] + recs[i + 1 :]
    elif op == "duplicate":
        tampered = recs[: i + 1] + recs[i:]
        i += 1  # the first copy is good
    elif op == "swap":
        j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i), label="j")
        tampered = list(recs)
        tampered[i], tampered[j] = tampered[j], tampered[i]
        i = min(i, j)
    else:
        key = {"other-carrier": OTHER_W2E, "other-direction": E2W, "inject": W2E}[op]
        foreign = records(key, plains)
        if op == "inject":
            # A record sealed with the right key at the wrong place in the sequence.
            j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i), label="j")
            tampered = [*recs[:i], foreign[j], *recs[i:]]
        else:
            tampered = [*recs[:i], foreign[i], *recs[i + 1 :]]
    stream = b"".join(tampered)
    expect_refused(W2E, [stream], plains[:i])
    cut = data.draw(cuts, label="cuts")
    expect_refused(W2E, split_at(stream, cut), plains[:i])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), cuts, st.booleans())
def test_random_bytes_give_only_seal_errors(junk: bytes, cut: list[int], after_good: bool) -> None:
    prefix = b"".join(records(W2E, [b"good"])) if after_good else b""
    unsealer = sl.Unsealer(W2E)
    try:
        for chunk in split_at(prefix + junk, cut):
            unsealer.feed(chunk)
    except sl.SealError:
        pass
    # anything else propagates and fails the test


@pytest.mark.parametrize("length", [0, 1, 16, sl.MAX_RECORD + 17, 2**32 - 1])
def test_bad_length_is_refused_at_once(length: int) -> None:
    unsealer = sl.Unsealer(W2E)
    with pytest.raises(sl.SealError, match="out of range"):
        unsealer.feed(struct.pack("!I", length))


@pytest.mark.parametrize("length", [17, sl.MAX_RECORD + 16])
def test_extreme_good_lengths_wait_for_the_body(length: int) -> None:
    unsealer = sl.Unsealer(W2E)
    assert unsealer.feed(struct.pack("!I", length) + bytes(10)) == []
    assert unsealer.mid_record


def test_refuses_everything_after_an_error() -> None:
    good = records(W2E, [b"one", b"two"])
    unsealer = sl.Unsealer(W2E)
    assert unsealer.feed(good[0]) == [b"one"]
    bad = bytearray(good[1])
    bad[-1] ^= 1
    with pytest.raises(sl.SealError, match="record 1 failed authentication"):
        unsealer.feed(bytes(bad))
    for more in (b"", good[1], bytes(bad)):
        with pytest.raises(sl.SealError, match="after an earlier error"):
            unsealer.feed(more)
    assert issubclass(sl.SealError, ProtocolError)


# ---------------------------------------------------------------------------------------------
# sequence numbers


def test_sealer_refuses_to_wrap() -> None:
    sealer = sl.Sealer(W2E)
    sealer._seq = sl.SEQ_LIMIT - 2
    head, body = sealer.seal([b"last but one"])
    assert AESGCM(W2E).decrypt(bytes(4) + b"\xff" * 7 + b"\xfe", body, head) == b"last but one"
    with pytest.raises(sl.SealError, match="sequence numbers"):
        sealer.seal([payload(MAX + 1)])  # two records, one number left: nothing is sealed
    assert sealer.sequence == sl.SEQ_LIMIT - 1
    with pytest.raises(sl.SealError, match="sequence numbers"):
        sealer.seal([b"x"])  # and the direction stays refused

    sealer = sl.Sealer(W2E)
    sealer._seq = sl.SEQ_LIMIT - 1
    head, body = sealer.seal([b"last"])
    assert AESGCM(W2E).decrypt(bytes(4) + b"\xff" * 8, body, head) == b"last"
    assert sealer.sequence == sl.SEQ_LIMIT
    with pytest.raises(sl.SealError, match="sequence numbers"):
        sealer.seal([b"x"])
    with pytest.raises(sl.SealError, match="sequence numbers"):
        sealer.seal([])


def test_unsealer_refuses_to_wrap() -> None:
    sealer = sl.Sealer(W2E)
    sealer._seq = sl.SEQ_LIMIT - 1
    last = b"".join(sealer.seal([b"last"]))
    replay = b"".join(sl.Sealer(W2E).seal([b"first"]))
    unsealer = sl.Unsealer(W2E)
    unsealer._seq = sl.SEQ_LIMIT - 1
    assert unsealer.feed(last) == [b"last"]
    with pytest.raises(sl.SealError, match="sequence numbers"):
        unsealer.feed(replay)

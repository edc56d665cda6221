"""The sans-IO half of ``relay-exit --workers``: who owns a HELLO, and the handoff message."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import handoff as ho

workers = st.integers(min_value=1, max_value=ho.MAX_PROCESSES)


@given(workers, st.data())
def test_a_session_id_names_its_maker(n: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    sid = ho.new_session_id(index, n, os.urandom)
    assert len(sid) == 16 and sid != bytes(16)
    assert ho.session_owner(sid, n) == index
    for reader in range(n):  # whichever process reads the resume hands it to the maker
        assert ho.owner(True, os.urandom(16), sid, reader, n) == index


def test_a_single_process_keeps_fully_random_ids_and_never_the_zero_id() -> None:
    draws = iter([bytes(16), b"\x07" * 16])
    assert ho.new_session_id(0, 1, lambda size: next(draws)) == b"\x07" * 16
    zeros = iter([bytes(15), b"\x01" * 15])
    assert ho.new_session_id(0, 2, lambda size: next(zeros)) == b"\x00" + b"\x01" * 15
    with pytest.raises(ValueError):
        ho.new_session_id(2, 2, os.urandom)


@given(workers, st.binary(min_size=16, max_size=16), st.data())
def test_a_new_hello_goes_to_its_nonce_owner_from_any_reader(
    n: int, nonce: bytes, data: st.DataObject
) -> None:
    owners = {ho.owner(False, nonce, bytes(16), reader, n) for reader in range(n)}
    assert len(owners) == 1  # a replay lands on the same nonce table wherever it arrives
    assert 0 <= owners.pop() < n


@given(st.binary(min_size=16, max_size=16), st.integers(min_value=2, max_value=ho.MAX_PROCESSES))
def test_a_session_no_process_made_stays_with_its_reader(sid: bytes, n: int) -> None:
    sid = bytes((n + sid[0] % (256 - n),)) + sid[1:]
    assert ho.session_owner(sid, n) is None
    assert ho.owner(True, bytes(16), sid, 1, n) == 1


def test_nonces_spread_over_the_processes() -> None:
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[ho.nonce_owner(os.urandom(16), 3)] += 1
    assert min(counts) > 800


@given(
    st.sampled_from(sorted(ho.KIND_NAMES)),
    st.integers(min_value=0, max_value=ho.MAX_PROCESSES - 1),
    st.binary(max_size=4096),
    st.data(),
)
def test_handoff_round_trip(kind: int, source: int, raw: bytes, data: st.DataObject) -> None:
    sent = data.draw(st.integers(min_value=0, max_value=len(raw)))
    message = ho.encode(kind, source, sent, raw)
    assert ho.decode(message) == ho.Handoff(kind, source, sent, raw)


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_protocol_error_or_parses(message: bytes) -> None:
    try:
        parsed = ho.decode(message)
    except ProtocolError:
        return
    assert ho.encode(parsed.kind, parsed.source, parsed.sent, parsed.data) == message


def test_broken_messages_are_refused_with_a_reason() -> None:
    good = ho.encode(ho.KIND_NEW, 1, 2, b"\x05\x01\x80hello")
    for broken in (
        good[:5],
        good[:-1],
        good + b"x",
        b"\x09" + good[1:],
        good[:1] + b"\x09" + good[2:],
    ):
        with pytest.raises(ProtocolError):
            ho.decode(broken)
    with pytest.raises(ValueError):
        ho.encode(ho.KIND_NEW, 0, 0, bytes(ho.MAX_HANDSHAKE_BYTES + 1))

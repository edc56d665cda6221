"""Tests for the HELLO sub-negotiation (:mod:`relay.proto.hello`): codec, MACs, replay guard."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError, seal
from relay.proto import hello as hl
from relay.proto import socks5 as s5

SECRET = b"k" * 32
KEY_ID = "worker-1"
TS = 1700000000000
NONCE = bytes(range(16))
SESSION = bytes(range(16, 32))
EXIT_NONCE = bytes(range(32, 48))
EXIT_TS = 1700000000123

# Test vectors quoted in docs/PROTOCOL.md.
HELLO_VECTOR = (
    "0208776f726b65722d310000018bcfe56800000102030405060708090a0b0c0d0e0f"
    "00000000000000000000000000000000"
    "0000000000000000000061a800"
    "8039f698384a982e5770a6c306d68d9ab85442342b505e3563429705c383717e"
)
REPLY_VECTOR = (
    "0200101112131415161718191a1b1c1d1e1f000000000000000000006"
    "1a8202122232425262728292a2b2c2d2e2f0000018bcfe5687b"
    "94adae34c04c04a33409e0d15b72d170c5f348c0be18d02580957b538f9f4e24"
)
SESSION_KEY_VECTOR = "68fbbc37dcfd008a140c85fbbbf4cfa4a170a06698729d01f93009406f1037c1"
JOIN_TS = 1700000000456
JOIN_NONCE = bytes(range(48, 64))
JOIN_VECTOR = (
    "0208776f726b65722d310000018bcfe569c8303132333435363738393a3b3c3d3e3f"
    "101112131415161718191a1b1c1d1e1f"
    "0000000000000000000061a800"
    "2be0cab8da0203b361cf2c9b4c33781eb9dceb242b2195aae3cad1a69371373f"
)
"""A further carrier (or a resume) of the session above, signed with the session key."""

key_ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
b16 = st.binary(min_size=16, max_size=16)
secrets_ = st.binary(min_size=1, max_size=64)


def vector_hello() -> bytes:
    return hl.encode_hello(SECRET, KEY_ID, TS, NONCE, hl.NEW_SESSION, 0, 25000)


def vector_reply(hello_mac: bytes) -> bytes:
    return hl.encode_reply(SECRET, hello_mac, hl.OK, SESSION, 0, 25000, EXIT_NONCE, EXIT_TS)


def decoded_hello(wire: bytes) -> hl.Hello:
    parsed = hl.decode_hello(wire)
    assert parsed is not None
    hello, used = parsed
    assert used == len(wire)
    return hello


def decoded_reply(wire: bytes) -> hl.HelloReply:
    parsed = hl.decode_reply(wire)
    assert parsed is not None
    reply, used = parsed
    assert used == len(wire) == hl.REPLY_SIZE
    return reply


# ---------------------------------------------------------------------------------------------
# test vectors


def test_hello_vector() -> None:
    wire = vector_hello()
    assert wire.hex() == HELLO_VECTOR
    # Independent construction from the documented layout.
    signed = (
        bytes([2, 8]) + b"worker-1" + struct.pack("!Q16s16sQIB", TS, NONCE, bytes(16), 0, 25000, 0)
    )
    mac = hmac.new(SECRET, b"hpc-relay/2 hello" + signed, hashlib.sha256).digest()
    assert wire == signed + mac
    hello = decoded_hello(wire)
    assert hello == hl.Hello(KEY_ID, TS, NONCE, hl.NEW_SESSION, 0, 25000, 0, mac, signed)
    assert not hello.is_resume
    assert hl.verify_hello(hello, SECRET)


def test_reply_vector() -> None:
    hello_mac = vector_hello()[-hl.MAC_SIZE :]
    wire = vector_reply(hello_mac)
    assert wire.hex() == REPLY_VECTOR
    body = struct.pack("!BB16sQI16sQ", 2, 0, SESSION, 0, 25000, EXIT_NONCE, EXIT_TS)
    mac = hmac.new(SECRET, b"hpc-relay/2 hello-reply" + hello_mac + body, hashlib.sha256).digest()
    assert wire == body + mac
    reply = decoded_reply(wire)
    assert reply == hl.HelloReply(hl.OK, SESSION, 0, 25000, EXIT_NONCE, EXIT_TS, mac, body)
    assert hl.verify_reply(reply, SECRET, hello_mac)


def test_session_key_vector() -> None:
    key = hl.session_key(SECRET, NONCE, EXIT_NONCE, SESSION)
    assert key.hex() == SESSION_KEY_VECTOR
    expected = hmac.new(
        SECRET, b"hpc-relay/2 session" + NONCE + EXIT_NONCE + SESSION, hashlib.sha256
    ).digest()
    assert key == expected


def test_join_vector() -> None:
    """A further carrier of the session: its id, and the session key (not the secret)."""
    key = bytes.fromhex(SESSION_KEY_VECTOR)
    wire = hl.encode_hello(key, KEY_ID, JOIN_TS, JOIN_NONCE, SESSION, 0, 25000)
    assert wire.hex() == JOIN_VECTOR
    signed = (
        bytes([2, 8])
        + b"worker-1"
        + struct.pack("!Q16s16sQIB", JOIN_TS, JOIN_NONCE, SESSION, 0, 25000, 0)
    )
    mac = hmac.new(key, b"hpc-relay/2 hello" + signed, hashlib.sha256).digest()
    assert wire == signed + mac
    hello = decoded_hello(wire)
    assert hello.is_resume and hello.session_id == SESSION
    assert hl.verify_hello(hello, key) and not hl.verify_hello(hello, SECRET)


SEAL_KEYS_VECTOR = (
    "d9e745368000389f67311055c6937550b01a8177b1166451db63e5162ed09d31",
    "89fdf4b4e6837dcd9fe85c1969c1b67f1b7955b89660e465d9a32c3af7cc8fc9",
)
OPEN_ADDRESS_VECTOR = "0315636f6c6c6563746f722e6578616d706c652e6f72672592"


def test_sealing_keys_and_open_address_vectors() -> None:
    """The first carrier's record keys (worker-to-exit, exit-to-worker) of the session above,
    and the destination bytes of an OPEN, as docs/PROTOCOL.md quotes them."""
    key = hl.session_key(SECRET, NONCE, EXIT_NONCE, SESSION)
    to_exit, to_worker = seal.derive_keys(key, NONCE, EXIT_NONCE)
    assert (to_exit.hex(), to_worker.hex()) == SEAL_KEYS_VECTOR
    label = b"hpc-relay/2 seal "
    assert to_exit == hmac.new(key, label + b"w2e" + NONCE + EXIT_NONCE, hashlib.sha256).digest()
    assert s5.encode_address("collector.example.org", 9618).hex() == OPEN_ADDRESS_VECTOR


def test_version_1_hellos_and_replies_are_refused() -> None:
    """A v1 peer (one carrier per stream) fails at the version byte, before any MAC."""
    v1_hello = bytes([1]) + vector_hello()[1:]
    with pytest.raises(ProtocolError, match="version 1"):
        hl.decode_hello(v1_hello)
    with pytest.raises(ProtocolError, match="version 1"):
        hl.decode_reply(bytes([1]) + vector_reply(bytes(32))[1:])


# ---------------------------------------------------------------------------------------------
# round trips


@settings(max_examples=150, deadline=None)
@given(secrets_, key_ids, u64, b16, b16, u64, u32)
def test_hello_round_trip(
    key: bytes, key_id: str, ts: int, nonce: bytes, session: bytes, offset: int, hb: int
) -> None:
    wire = hl.encode_hello(key, key_id, ts, nonce, session, offset, hb)
    assert len(wire) == 2 + len(key_id) + 8 + 16 + 16 + 8 + 4 + 1 + hl.MAC_SIZE
    parsed = hl.decode_hello(wire + b"trailing bytes")
    assert parsed is not None
    hello, used = parsed
    assert used == len(wire)
    assert hello.key_id == key_id
    assert hello.timestamp_ms == ts
    assert hello.nonce == nonce
    assert hello.session_id == session
    assert hello.recv_offset == offset
    assert hello.heartbeat_ms == hb
    assert hello.flags == 0
    assert hello.mac == wire[-hl.MAC_SIZE :]
    assert hello.signed == wire[: -hl.MAC_SIZE]
    assert hello.is_resume == (session != hl.NEW_SESSION)
    assert hl.verify_hello(hello, key)


@settings(max_examples=150, deadline=None)
@given(secrets_, b16, st.integers(0, 255), b16, u64, u32, b16, u64)
def test_reply_round_trip(
    key: bytes,
    hello_mac_seed: bytes,
    status: int,
    session: bytes,
    offset: int,
    hb: int,
    nonce: bytes,
    ts: int,
) -> None:
    hello_mac = hello_mac_seed * 2
    wire = hl.encode_reply(key, hello_mac, status, session, offset, hb, nonce, ts)
    assert len(wire) == hl.REPLY_SIZE
    parsed = hl.decode_reply(wire + b"more")
    assert parsed is not None
    reply, used = parsed
    assert used == hl.REPLY_SIZE
    assert (reply.status, reply.session_id, reply.recv_offset) == (status, session, offset)
    assert (reply.heartbeat_ms, reply.nonce, reply.timestamp_ms) == (hb, nonce, ts)
    assert hl.verify_reply(reply, key, hello_mac)


def test_failure_reply_is_unauthenticated() -> None:
    hello_mac = vector_hello()[-hl.MAC_SIZE :]
    reply = decoded_reply(hl.encode_reply(None, hello_mac, hl.BAD_AUTH))
    assert reply.status == hl.BAD_AUTH
    assert reply.mac == bytes(hl.MAC_SIZE)
    assert reply.session_id == hl.NEW_SESSION
    assert not hl.verify_reply(reply, SECRET, hello_mac)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"key_id": ""}, ValueError),
        ({"key_id": "x" * 65}, ValueError),
        ({"key_id": "w\u00f6rker"}, ValueError),
        ({"nonce": bytes(15)}, ValueError),
        ({"session_id": bytes(17)}, ValueError),
    ],
)
def test_encode_hello_rejects_bad_arguments(kwargs: dict, exc: type) -> None:
    args = {"key_id": KEY_ID, "nonce": NONCE, "session_id": hl.NEW_SESSION}
    args.update(kwargs)
    with pytest.raises(exc):
        hl.encode_hello(SECRET, args["key_id"], TS, args["nonce"], args["session_id"])


def test_key_id_length_limits() -> None:
    assert decoded_hello(hl.encode_hello(SECRET, "a", TS, NONCE)).key_id == "a"
    assert decoded_hello(hl.encode_hello(SECRET, "b" * 64, TS, NONCE)).key_id == "b" * 64


# ---------------------------------------------------------------------------------------------
# MAC verification


# HMAC pads a key with NUL bytes, so two keys that differ only in trailing NULs are one key;
# the key file loaders refuse control characters in a secret, so no such pair is configured.
printable_secrets = st.binary(min_size=1, max_size=64).filter(lambda k: b"\0" not in k)


@settings(max_examples=100, deadline=None)
@given(printable_secrets, printable_secrets, key_ids, u64, b16)
def test_hello_wrong_key_fails(
    key: bytes, other: bytes, key_id: str, ts: int, nonce: bytes
) -> None:
    hello = decoded_hello(hl.encode_hello(key, key_id, ts, nonce))
    assert hl.verify_hello(hello, key)
    assert hl.verify_hello(hello, other) == (other == key)


@settings(max_examples=300, deadline=None)
@given(key_ids, b16, b16, u64, st.data())
def test_hello_any_flipped_bit_is_rejected(
    key_id: str, nonce: bytes, session: bytes, offset: int, data
) -> None:
    wire = bytearray(hl.encode_hello(SECRET, key_id, TS, nonce, session, offset, 30000))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1), label="bit")
    wire[bit // 8] ^= 1 << (bit % 8)
    try:
        parsed = hl.decode_hello(bytes(wire))
    except ProtocolError:
        return  # rejected while parsing (version, key id length or key id charset)
    if parsed is None:
        return  # claims a longer key id: waits for bytes that a valid HELLO never has
    hello, _ = parsed
    assert not hl.verify_hello(hello, SECRET)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), b16, u64, st.data())
def test_reply_any_flipped_bit_is_rejected(status: int, session: bytes, offset: int, data) -> None:
    hello_mac = vector_hello()[-hl.MAC_SIZE :]
    wire = bytearray(
        hl.encode_reply(SECRET, hello_mac, status, session, offset, 25000, EXIT_NONCE, EXIT_TS)
    )
    bit = data.draw(st.integers(0, len(wire) * 8 - 1), label="bit")
    wire[bit // 8] ^= 1 << (bit % 8)
    try:
        parsed = hl.decode_reply(bytes(wire))
    except ProtocolError:
        assert bit < 8  # only the version byte is checked while parsing
        return
    assert parsed is not None
    assert not hl.verify_reply(parsed[0], SECRET, hello_mac)


def test_reply_mac_binds_to_the_hello() -> None:
    hello1 = decoded_hello(hl.encode_hello(SECRET, KEY_ID, TS, NONCE))
    hello2 = decoded_hello(hl.encode_hello(SECRET, KEY_ID, TS, bytes(range(1, 17))))
    assert hello1.mac != hello2.mac
    reply = decoded_reply(vector_reply(hello1.mac))
    assert hl.verify_reply(reply, SECRET, hello1.mac)
    # The same reply, recorded and played back to a worker that sent another HELLO, fails.
    assert not hl.verify_reply(reply, SECRET, hello2.mac)
    # And a reply signed with the right secret but for the other HELLO fails as well.
    other = decoded_reply(vector_reply(hello2.mac))
    assert not hl.verify_reply(other, SECRET, hello1.mac)
    assert not hl.verify_reply(reply, b"x" * 32, hello1.mac)


@settings(max_examples=100, deadline=None)
@given(b16, b16)
def test_reply_for_another_hello_never_verifies(mac_a: bytes, mac_b: bytes) -> None:
    a, b = mac_a * 2, mac_b * 2
    reply = decoded_reply(hl.encode_reply(SECRET, a, hl.OK, SESSION, 0, 1, EXIT_NONCE, 1))
    assert hl.verify_reply(reply, SECRET, b) == (a == b)


def test_hello_and_reply_macs_are_domain_separated() -> None:
    """A HELLO MAC cannot be passed off as a reply MAC over the same bytes and vice versa."""
    hello = decoded_hello(vector_hello())
    fake = hl.HelloReply(0, SESSION, 0, 0, EXIT_NONCE, 0, hello.mac, hello.signed)
    assert not hl.verify_reply(fake, SECRET, b"")
    reply = decoded_reply(vector_reply(hello.mac))
    fake_hello = hello._replace(mac=reply.mac, signed=reply.signed)
    assert not hl.verify_hello(fake_hello, SECRET)


# ---------------------------------------------------------------------------------------------
# session key


def test_session_key_same_on_both_sides_and_authenticates_resume() -> None:
    # Worker side: its nonce and the reply's fields.
    hello_wire = hl.encode_hello(SECRET, KEY_ID, TS, NONCE)
    reply = decoded_reply(vector_reply(hello_wire[-hl.MAC_SIZE :]))
    worker_key = hl.session_key(SECRET, NONCE, reply.nonce, reply.session_id)
    # Exit side: the HELLO's nonce and what it put in its reply.
    hello = decoded_hello(hello_wire)
    exit_key = hl.session_key(SECRET, hello.nonce, EXIT_NONCE, SESSION)
    assert worker_key == exit_key
    assert len(worker_key) == 32
    assert worker_key != SECRET
    resume = decoded_hello(hl.encode_hello(worker_key, KEY_ID, TS + 5, NONCE[::-1], SESSION, 99))
    assert resume.is_resume
    assert hl.verify_hello(resume, exit_key)
    assert not hl.verify_hello(resume, SECRET)  # the long-term secret alone does not verify


@settings(max_examples=100, deadline=None)
@given(b16, b16, b16, b16, b16, b16)
def test_session_key_differs_per_nonce_and_session(
    wn1: bytes, en1: bytes, sid1: bytes, wn2: bytes, en2: bytes, sid2: bytes
) -> None:
    k1 = hl.session_key(SECRET, wn1, en1, sid1)
    k2 = hl.session_key(SECRET, wn2, en2, sid2)
    assert (k1 == k2) == ((wn1, en1, sid1) == (wn2, en2, sid2))
    assert hl.session_key(b"other", wn1, en1, sid1) != k1


def test_session_key_inputs_each_matter() -> None:
    base = hl.session_key(SECRET, NONCE, EXIT_NONCE, SESSION)
    assert hl.session_key(SECRET, EXIT_NONCE, NONCE, SESSION) != base
    assert hl.session_key(SECRET, NONCE, EXIT_NONCE, bytes(16)) != base
    assert hl.session_key(SECRET, NONCE, bytes(16), SESSION) != base
    assert hl.session_key(SECRET, bytes(16), EXIT_NONCE, SESSION) != base


# ---------------------------------------------------------------------------------------------
# decoding partial and garbage input


def test_truncated_hello_returns_none() -> None:
    wire = vector_hello()
    for n in range(len(wire)):
        assert hl.decode_hello(wire[:n]) is None, n
        assert hl.decode_hello(bytearray(wire[:n])) is None, n
    assert hl.decode_hello(bytearray(wire)) is not None


def test_truncated_reply_returns_none() -> None:
    wire = vector_reply(bytes(32))
    for n in range(len(wire)):
        assert hl.decode_reply(wire[:n]) is None, n
    assert hl.decode_reply(bytearray(wire)) is not None


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00\x08",  # version 0
        b"\x01\x08",  # version 1
        b"\x03\x08",  # version 3
        b"\x02\x00",  # empty key id
        b"\x02\x41",  # key id longer than 64
        b"\x02\x02\xff\xfe" + bytes(53 + 32),  # non-ASCII key id
    ],
)
def test_bad_hello_raises_protocol_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        hl.decode_hello(wire)


@pytest.mark.parametrize("first", [0, 1, 3, 5, 0xFF])
def test_bad_reply_version_raises_protocol_error(first: int) -> None:
    with pytest.raises(ProtocolError):
        hl.decode_reply(bytes([first]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_hello_raises_only_protocol_error(blob: bytes) -> None:
    try:
        parsed = hl.decode_hello(blob)
    except ProtocolError:
        return
    if parsed is not None:
        hello, used = parsed
        assert 2 < used <= len(blob)
        assert hello.signed + hello.mac == blob[:used]
        assert not hl.verify_hello(hello, SECRET)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_reply_raises_only_protocol_error(blob: bytes) -> None:
    try:
        parsed = hl.decode_reply(blob)
    except ProtocolError:
        return
    if parsed is not None:
        reply, used = parsed
        assert used == hl.REPLY_SIZE
        assert reply.signed + reply.mac == blob[:used]


# ---------------------------------------------------------------------------------------------
# replay guard

NOW = 1_800_000_000_000


def nonce(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.mark.parametrize(
    ("skew", "status"),
    [
        (0, hl.OK),
        (120_000, hl.OK),
        (-120_000, hl.OK),
        (120_001, hl.CLOCK_SKEW),
        (-120_001, hl.CLOCK_SKEW),
        (10**9, hl.CLOCK_SKEW),
        (-(10**9), hl.CLOCK_SKEW),
    ],
)
def test_replay_guard_clock_window_both_directions(skew: int, status: int) -> None:
    guard = hl.ReplayGuard()
    assert guard.check(NOW + skew, nonce(1), NOW) == status
    assert len(guard) == (1 if status == hl.OK else 0)


def test_replay_guard_custom_window() -> None:
    guard = hl.ReplayGuard(window_s=1.5)
    assert guard.window_ms == 1500
    assert guard.check(NOW - 1500, nonce(1), NOW) == hl.OK
    assert guard.check(NOW + 1501, nonce(2), NOW) == hl.CLOCK_SKEW


def test_replay_guard_refuses_replays() -> None:
    guard = hl.ReplayGuard()
    assert guard.check(NOW, nonce(1), NOW) == hl.OK
    assert guard.check(NOW, nonce(1), NOW) == hl.REPLAY
    assert guard.check(NOW, nonce(1), NOW + 60_000) == hl.REPLAY
    assert guard.check(NOW + 1000, nonce(1), NOW + 1000) == hl.REPLAY  # same nonce, other time
    assert guard.check(NOW, nonce(2), NOW) == hl.OK
    assert len(guard) == 2


def test_replay_guard_skewed_hello_does_not_burn_the_nonce() -> None:
    guard = hl.ReplayGuard()
    assert guard.check(NOW - 200_000, nonce(1), NOW) == hl.CLOCK_SKEW
    assert guard.check(NOW, nonce(1), NOW) == hl.OK


def test_replay_guard_expire_drops_only_unreplayable_entries() -> None:
    guard = hl.ReplayGuard()
    for i in range(10):
        assert guard.check(NOW + i * 10_000, nonce(i), NOW + i * 10_000) == hl.OK
    assert len(guard) == 10
    # At NOW + 155 s the window reaches back to NOW + 35 s: entries 0..3 can never be
    # accepted again (clock skew), entries 4..9 still could.
    later = NOW + 155_000
    guard.expire(later)
    assert len(guard) == 6
    for i in range(4, 10):
        assert guard.check(NOW + i * 10_000, nonce(i), later) == hl.REPLAY
    for i in range(4):
        assert guard.check(NOW + i * 10_000, nonce(i), later) == hl.CLOCK_SKEW
    guard.expire(NOW + 10**9)
    assert len(guard) == 0


def test_replay_guard_memory_is_bounded() -> None:
    guard = hl.ReplayGuard(max_entries=3)
    for i in range(3):
        assert guard.check(NOW, nonce(i), NOW) == hl.OK
    # Full, and nothing has expired yet: refuse rather than forget a live nonce.
    assert guard.check(NOW, nonce(3), NOW) == hl.BUSY
    assert len(guard) == 3
    assert guard.check(NOW, nonce(0), NOW) == hl.REPLAY
    # Once the stored entries are out of the window they make room.
    later = NOW + 120_001
    assert guard.check(later, nonce(3), later) == hl.OK
    assert len(guard) == 1


def test_replay_guard_forgets_old_nonces_without_explicit_expire() -> None:
    """The exit only ever calls check(): memory must stay at about rate x 2 windows."""
    guard = hl.ReplayGuard(window_s=120)
    peak = 0
    for second in range(3600):  # one HELLO a second for an hour
        now = NOW + second * 1000
        assert guard.check(now, nonce(second), now) == hl.OK
        peak = max(peak, len(guard))
    assert peak <= 2 * 120 + 2
    # Everything still inside the window is remembered.
    last = NOW + 3599 * 1000
    for second in range(3600 - 120, 3600):
        assert guard.check(NOW + second * 1000, nonce(second), last) == hl.REPLAY


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 400_000),  # time advance (ms)
            st.integers(-300_000, 300_000),  # sender's clock offset (ms)
            st.integers(0, 5),  # nonce index: few values, so replays are frequent
            st.booleans(),  # call expire() first
        ),
        max_size=40,
    ),
    st.integers(1, 8),
)
def test_replay_guard_never_accepts_a_hello_twice(steps, max_entries: int) -> None:
    guard = hl.ReplayGuard(max_entries=max_entries)
    now = NOW
    sent: list[tuple[int, bytes]] = []  # every HELLO ever sent, replayable by an attacker
    accepted: set[tuple[int, bytes]] = set()
    for advance, offset, idx, expire in steps:
        now += advance
        if expire:
            guard.expire(now)
        # A fresh HELLO, then a replay of every earlier one.
        sent.append((now + offset, nonce(idx)))
        for ts, n in sent:
            status = guard.check(ts, n, now)
            assert status in (hl.OK, hl.CLOCK_SKEW, hl.REPLAY, hl.BUSY)
            if status == hl.OK:
                assert (ts, n) not in accepted
                accepted.add((ts, n))
            if abs(ts - now) > guard.window_ms:
                assert status == hl.CLOCK_SKEW
        assert len(guard) <= max_entries

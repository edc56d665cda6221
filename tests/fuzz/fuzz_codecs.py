"""Long fuzzing runs of the sans-IO protocol codecs with atheris (coverage-guided, libFuzzer).

    make fuzz                              # installs atheris, runs for FUZZ_SECONDS (600)
    .venv/bin/python tests/fuzz/fuzz_codecs.py -max_total_time=60 .fuzz-corpus

The first input byte picks a target, the second how the rest is cut into reads (and, for
the session, its role and whether the bytes are sealed first): the SOCKS5 codec (both sides),
HELLO and its reply, the worker's carrier opener, the v2 frame decoder, the record unsealer,
a whole session receiving carrier bytes, and the HTTP CONNECT parser. Each may refuse input
only with ProtocolError (its documented failure); the session's promises (credit, the
buffered tally) are checked after every read. Any other exception is a crash that atheris
reports with the input that caused it. ``one_input`` is plain Python, so
tests/unit/test_fuzz_harness.py runs it under pytest too (this file is not collected itself).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

_instrument: Any = contextlib.nullcontext()
if __name__ == "__main__":  # run by atheris: instrument the codecs for coverage feedback
    import atheris

    _instrument = atheris.instrument_imports()

with _instrument:
    from relay.proto import ProtocolError, mux, seal
    from relay.proto import hello as hl
    from relay.proto import httpconnect as hc
    from relay.proto import session as ms
    from relay.proto import socks5 as s5
    from relay.proto.opener import CarrierOpener

KEY = b"k" * 32
SEAL_KEY = bytes(range(32))
ADDRESS = b"\x03\x15collector.example.org\x25\x92"


def pieces(data: bytes, cut: int) -> Iterator[bytes]:
    """``data`` in reads of 1..cut+1 bytes (cut 255: all at once)."""
    if cut == 255:
        yield data
        return
    step = cut + 1
    for start in range(0, len(data), step):
        yield data[start : start + step]


def socks5_server(data: bytes, cut: int) -> None:
    """The exit's handshake parser, answering every event as the exit would: the tunnel's
    data phase starts right after the HELLO (no request), a plain client's after its reply."""
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
    for piece in pieces(data, cut):
        events = server.receive(piece)
        while events:
            event = events.pop(0)
            if isinstance(event, s5.Greeting):
                for method in (hl.METHOD_TUNNEL, s5.USERPASS, s5.NO_AUTH):
                    if method in event.methods:
                        server.select_method(method)
                        break
                else:
                    server.select_method(s5.NO_ACCEPTABLE)
                    return
            elif isinstance(event, s5.SubNegotiation):
                assert isinstance(event.message, hl.Hello)
                if not hl.verify_hello(event.message, KEY):
                    server.subnegotiation_done(False)
                    return
                server.trailing()  # sealed records from here on
                return
            elif isinstance(event, s5.UserPass):
                server.auth_reply(len(event.password) % 2 == 0)
            elif isinstance(event, s5.Request):
                server.reply(s5.SUCCEEDED, event.host, event.port)
                server.trailing()
                return
            if server.state == "closed":
                return
            events += server.receive()


def socks5_client(data: bytes, cut: int) -> None:
    client = s5.Socks5Client({hl.METHOD_TUNNEL: hl.decode_reply})
    client.greeting(bytes((hl.METHOD_TUNNEL, s5.USERPASS, s5.NO_AUTH)))
    for piece in pieces(data, cut):
        client.receive(piece)


def hello(data: bytes, cut: int) -> None:
    decoded = hl.decode_hello(data)
    if decoded is not None:
        hl.verify_hello(decoded[0], KEY)
    reply = hl.decode_reply(data)
    if reply is not None:
        hl.verify_reply(reply[0], KEY, bytes(32))
    if cut % 2:
        s5.decode_address(data)


def opener(data: bytes, cut: int) -> None:
    """The worker's parser of the exit's answer (a new session, or a join)."""
    join = cut % 2 == 1
    carrier = CarrierOpener(
        key=KEY, key_id="fuzz", now_ms=1, nonce=bytes(16), heartbeat_ms=1000,
        session_id=b"\1" * 16 if join else hl.NEW_SESSION,
    )  # fmt: skip
    carrier.first_flight()
    for piece in pieces(data, cut // 2):
        carrier.receive(piece)
    carrier.trailing()


def frames(data: bytes, cut: int) -> None:
    decoder = mux.FrameDecoder()
    for piece in pieces(data, cut):
        for frame in decoder.feed(piece):
            assert type(frame) in FRAME_TYPES, frame
            if isinstance(frame, mux.Data):
                assert 0 < len(frame.payload) <= mux.MAX_DATA


FRAME_TYPES = (mux.Data, mux.Ack, mux.Fin, mux.Reset, mux.Open, mux.Reply, mux.Sync,
               mux.Ping, mux.Pong, mux.GoAway)  # fmt: skip


def unsealer(data: bytes, cut: int) -> None:
    """Records of one carrier direction, read in pieces of any size.

    Odd ``cut``: ``data`` is the wire; any bytes open with the key or raise. Even: ``data``,
    cut at every 0xFF byte, is sealed, and the wire must open to exactly those bytes; with
    ``cut & 2`` one bit of the wire is flipped first, and then nothing may open that was not
    sealed, and the tampered record must not open at all."""
    unseal = seal.Unsealer(SEAL_KEY)
    if cut & 1:
        for piece in pieces(data, cut):
            unseal.feed(piece)
        return
    sealer = seal.Sealer(SEAL_KEY)
    whole = data.replace(b"\xff", b"")
    wire = bytearray(b"".join(x for part in data.split(b"\xff") for x in sealer.seal([part])))
    tampered = bool(cut & 2) and bool(wire)
    if tampered:
        wire[(cut * 7919) % len(wire)] ^= 1 << ((cut >> 2) & 7)
    opened = bytearray()
    try:
        for piece in pieces(bytes(wire), cut):
            for plain in unseal.feed(piece):
                opened += plain
    except ProtocolError:
        assert tampered, "an untouched stream of records failed to open"
    assert whole.startswith(opened), "a record opened to bytes that were not sealed"
    if tampered:
        assert len(opened) < len(whole), "a tampered record opened"
    else:
        assert opened == whole


def session(data: bytes, cut: int) -> None:
    """One end of a v2 session (the exit for an even ``cut``, else the worker) receiving
    ``data`` as carrier bytes: as plain frames, or (``cut`` & 2) sealed into records first so
    that the record layer and the session are fuzzed together. The application answers OPENs
    (every third refused), sends and half-closes; carriers come and go; time passes."""
    role = ms.EXIT if cut % 2 == 0 else ms.WORKER
    sealed = bool(cut & 2)
    now = 1000.0
    end = ms.Session(role, heartbeat=1.0, now=now, misses=3, window=64 * 1024, tombstone_ttl=600.0)
    out_key = bytes(32)
    end.add_carrier(1, seal.Sealer(out_key) if sealed else None,
                    seal.Unsealer(SEAL_KEY) if sealed else None, now)  # fmt: skip
    wrap = seal.Sealer(SEAL_KEY)
    if role == ms.WORKER:
        for _ in range(3):
            sid = end.open(ADDRESS)
            end.send(sid, b"request %d" % sid)
        end.send_fin(1)
    carriers = [1]
    for index, piece in enumerate(pieces(data, cut >> 2)):
        now += 0.3
        wire = b"".join(wrap.seal([piece])) if sealed else piece
        try:
            events = end.receive(carriers[-1], wire, now)
        except ProtocolError:
            # the carrier is broken: it goes, its streams wait for (or move to) the next
            end.remove_carrier(carriers[-1], now)
            carriers.append(carriers[-1] + 1)
            end.add_carrier(carriers[-1], None, None, now)
            sealed = False
            continue
        for event in events:
            if isinstance(event, ms.Opened):
                end.answer(event.stream, 1 if event.stream % 3 == 0 else 0)
                end.send(event.stream, b"answer")
                if index % 2:
                    end.send_fin(event.stream)
            elif isinstance(event, ms.Received) and index % 5 == 4:
                end.reset(event.stream, mux.RST_PEER_RESET, "fuzz")
        for cid in list(end.carriers):
            end.output(cid, now, 1 << 16)
        for cid in end.tick(now):
            end.remove_carrier(cid, now)
        check_session(end)


def check_session(end: ms.Session) -> None:
    """What the session promises whatever it is fed: credit within the window, and the
    buffered tally equal to what the streams hold."""
    held = 0
    for stream in end.streams.values():
        assert 0 <= stream.sent - stream.acked <= end.window, "credit"
        held += stream.pending_len + stream.sent - stream.acked
    assert end.buffered == held, "buffered tally"


def http_connect(data: bytes, cut: int) -> None:
    parser = hc.HttpConnectParser()
    for piece in pieces(data, cut):
        request = parser.receive(piece)
        if request is not None:
            if request.method == "CONNECT":
                hc.connect_target(request.target)
            parser.trailing()
            return


TARGETS: list[Callable[[bytes, int], None]] = [
    socks5_server, socks5_client, hello, opener, frames, unsealer, session, http_connect,
]  # fmt: skip


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    with contextlib.suppress(ProtocolError):
        target(data[2:], data[1])


def seeds() -> dict[str, bytes]:
    """Valid inputs for each codec (docs/PROTOCOL.md's test vectors among them)."""
    hello_bytes = hl.encode_hello(KEY, "worker-1", 1700000000000, bytes(range(16)))
    reply = hl.encode_reply(KEY, hello_bytes[-32:], hl.OK, bytes(range(16, 32)), 0, 25000,
                            bytes(range(32, 48)), 1700000000123)  # fmt: skip
    worker_frames = (
        mux.encode_open(1, ADDRESS) + mux.data_header(1, 0, 5) + b"hello"
        + mux.encode_ack(1, 6) + mux.encode_ping(7) + mux.encode_pong(7)
        + mux.encode_fin(1, 5) + mux.encode_sync(1, 6, True) + mux.encode_reset(3, 1, "bye")
    )  # fmt: skip
    exit_frames = (
        mux.encode_reply(1, 0, b"\x01\xc6\x33\x64\x07\x25\x92") + mux.data_header(1, 0, 6)
        + b"answer" + mux.encode_ack(1, 9) + mux.encode_fin(1, 6) + mux.encode_reply(2, 2, ADDRESS)
        + mux.encode_goaway("drain")
    )  # fmt: skip
    records = b"".join(seal.Sealer(SEAL_KEY).seal([worker_frames[:40], worker_frames[40:]]))
    return {
        "socks5-tunnel": bytes((0, 255)) + b"\x05\x01\x80" + hello_bytes + records,
        "socks5-plain": bytes((0, 3))
        + b"\x05\x01\x02\x01\x02ab\x02cd"
        + s5.Socks5Client.request(s5.CMD_CONNECT, "collector.example.org", 9618)
        + b"early",
        "client": bytes((1, 255)) + b"\x05\x80" + reply,
        "hello": bytes((2, 255)) + hello_bytes,
        "address": bytes((2, 1)) + ADDRESS,
        "opener": bytes((3, 254)) + b"\x05\x80" + reply + records,
        "frames": bytes((4, 7)) + worker_frames + exit_frames,
        "unsealer": bytes((5, 31)) + records,
        "unsealer-roundtrip": bytes((5, 28)) + worker_frames + b"\xff" + exit_frames,
        "unsealer-tampered": bytes((5, 42)) + worker_frames + b"\xff" + exit_frames,
        "session-exit": bytes((6, 0b1111_1100)) + worker_frames,
        "session-exit-sealed": bytes((6, 0b0001_0010)) + worker_frames,
        "session-worker": bytes((6, 0b1111_1101)) + exit_frames,
        "http": bytes((7, 255)) + b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\nx",
    }


def main() -> None:
    import atheris

    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:  # start from valid inputs
        directory = Path(corpus[0])
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.iterdir()):
            for name, data in seeds().items():
                (directory / f"seed-{name}").write_bytes(data)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

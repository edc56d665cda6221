"""Long fuzzing runs of the sans-IO protocol codecs with atheris (coverage-guided, libFuzzer).

    make fuzz                              # installs atheris, runs for FUZZ_SECONDS (600)
    .venv/bin/python tests/fuzz/fuzz_codecs.py -max_total_time=60 .fuzz-corpus

The first input byte picks a codec, the second how the rest is cut into reads; each codec
may refuse input only with ProtocolError (its documented failure). Any other exception is a
crash that atheris reports with the input that caused it. ``one_input`` is plain Python, so
tests/test_fuzz_harness.py runs it under pytest too (this file is not collected itself).
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
    from relay.proto import ProtocolError
    from relay.proto import frames as fr
    from relay.proto import hello as hl
    from relay.proto import httpconnect as hc
    from relay.proto import socks5 as s5
    from relay.proto.opener import TunnelOpener
    from relay.proto.stream import TunnelStream

KEY = b"k" * 32


def pieces(data: bytes, cut: int) -> Iterator[bytes]:
    """``data`` in reads of 1..cut+1 bytes (cut 255: all at once)."""
    if cut == 255:
        yield data
        return
    step = cut + 1
    for start in range(0, len(data), step):
        yield data[start : start + step]


def socks5_server(data: bytes, cut: int) -> None:
    """The exit's handshake parser, answering every event as the exit would."""
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
                hl.verify_hello(event.message, KEY)
                server.subnegotiation_done(event.message.flags == 0)
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


def opener(data: bytes, cut: int) -> None:
    """The worker's parser of the exit's answers (new session or resume)."""
    resume = cut % 2 == 1
    tunnel = TunnelOpener(
        key=KEY, key_id="fuzz", now_ms=1, nonce=bytes(16), heartbeat_ms=1000,
        destination=None if resume else ("example.org", 443),
        session_id=b"\1" * 16 if resume else hl.NEW_SESSION,
    )  # fmt: skip
    tunnel.first_flight()
    for piece in pieces(data, cut // 2):
        tunnel.receive(piece)
    tunnel.trailing()


def frames(data: bytes, cut: int) -> None:
    decoder = fr.FrameDecoder()
    for piece in pieces(data, cut):
        for frame in decoder.feed(piece):
            assert type(frame).__name__ in ("Data", "Ack", "Ping", "Pong", "Fin", "Reset")


def stream(data: bytes, cut: int) -> None:
    """One end of the data phase: it sent 100 bytes and FIN, then receives ``data``."""
    tunnel = TunnelStream(heartbeat=1.0, now=0.0, leads_heartbeat=cut % 2 == 0)
    tunnel.send(b"x" * 100, 0.0)
    tunnel.send_fin(0.0)
    now = 0.0
    for piece in pieces(data, cut):
        now += 0.5
        tunnel.receive(piece, now)
        tunnel.poll(now)
        if tunnel.reset_seen:
            return
    tunnel.resume(tunnel.acked_offset, now)


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
    socks5_server, socks5_client, hello, opener, frames, stream, http_connect,
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
    connect = s5.Socks5Client.request(s5.CMD_CONNECT, "collector.example.org", 9618)
    data_phase = (
        fr.data_header(5) + b"hello" + fr.encode_ack(5, False) + fr.encode_ping(7)
        + fr.encode_pong(7) + fr.encode_fin(5) + fr.encode_reset(1, "bye")
    )  # fmt: skip
    return {
        "socks5-tunnel": bytes((0, 255)) + b"\x05\x01\x80" + hello_bytes + connect + b"early",
        "socks5-plain": bytes((0, 3)) + b"\x05\x01\x02\x01\x02ab\x02cd" + connect,
        "client": bytes((1, 255)) + b"\x05\x80" + reply + b"\x05\x00\x00\x01\0\0\0\0\0\0",
        "hello": bytes((2, 255)) + hello_bytes,
        "opener": bytes((3, 254)) + b"\x05\x80" + reply + b"\x05\x00\x00\x01\0\0\0\0\0\0",
        "frames": bytes((4, 7)) + data_phase,
        "stream": bytes((5, 255)) + fr.encode_ack(101, True) + data_phase[:-12],
        "http": bytes((6, 255)) + b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\nx",
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

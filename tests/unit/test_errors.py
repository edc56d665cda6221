"""The error root: every error the relay raises on purpose is a RelayError whose ``code`` is
what the peer is told on the wire and whose ``reason`` is the label metrics and logs use."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from glidein_wrapper.ready import NotReady
from relay.errors import ChannelRefused, ConfigError, DialFailed, OpenFailed, RelayError
from relay.exit.destinations import Refusal, resolve
from relay.exit.policy import Decision
from relay.metrics import Metrics
from relay.net.carrier import TcpCarrier, TunnelRefused, carrier_opener
from relay.net.openssh import OpenSshError
from relay.net.sshhop import SshUnavailable
from relay.net.tlslink import TlsError, TlsVerifyError
from relay.proto import ProtocolError, mux
from relay.proto import errors as proto_errors
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.proto.httpconnect import HttpConnectError
from relay.proto.opener import AuthFailed
from relay.proto.seal import SealError
from relay.worker.dialler import Dialler
from relay.worker.exitclient import SessionGone


def test_one_root() -> None:
    assert RelayError is proto_errors.RelayError
    for cls in (
        ProtocolError,
        AuthFailed,
        SealError,
        s5.Socks5Error,
        HttpConnectError,
        ConfigError,
        OpenFailed,
        DialFailed,
        ChannelRefused,
        TunnelRefused,
        Refusal,
        SshUnavailable,
        OpenSshError,
        TlsError,
        TlsVerifyError,
        SessionGone,
        NotReady,
    ):
        assert issubclass(cls, RelayError), cls
    assert issubclass(DialFailed, OpenFailed)
    # What callers catch as connection failures still is one.
    for cls in (TunnelRefused, SshUnavailable, OpenSshError, TlsError, ChannelRefused):
        assert issubclass(cls, ConnectionError), cls


def test_the_root_takes_code_and_reason_per_instance() -> None:
    plain = RelayError("something")
    assert (plain.code, plain.reason, str(plain)) == (None, "error", "something")
    given = RelayError("x", code=7, reason="label")
    assert (given.code, given.reason) == (7, "label")
    assert RelayError.code is None  # the class default is untouched


@pytest.mark.parametrize(
    ("error", "code", "reason", "message"),
    [
        (ProtocolError("bad frame"), None, "protocol-error", "bad frame"),
        (ConfigError("--exit: bad"), None, "config", "--exit: bad"),
        (OpenFailed(s5.NOT_ALLOWED, "exit: not allowed"), s5.NOT_ALLOWED, "refused", None),
        (
            DialFailed("no login node: down", "ssh-unavailable"),
            s5.GENERAL_FAILURE,
            "ssh-unavailable",
            "no login node: down",
        ),
        (
            ChannelRefused("connect failed"),
            s5.GENERAL_FAILURE,
            "exit-unreachable",
            "channel open failed: connect failed",
        ),
        (SshUnavailable("a: refused", 3.0, True), s5.GENERAL_FAILURE, "ssh-unavailable", None),
        (OpenSshError("auth", "Permission denied"), None, "auth", "Permission denied"),
        (TlsError("not TLS"), s5.GENERAL_FAILURE, "tls-failed", "not TLS"),
        (TlsVerifyError("no pin matches"), s5.GENERAL_FAILURE, "exit-tls", "no pin matches"),
        (
            TunnelRefused("hello", hl.CLOCK_SKEW),
            hl.CLOCK_SKEW,
            "exit-hello",
            "exit refused hello: clock-skew",
        ),
        (
            TunnelRefused("method", hl.BAD_AUTH),
            hl.BAD_AUTH,
            "exit-method",
            "exit refused method: bad-auth",
        ),
        (
            Refusal(s5.HOST_UNREACHABLE, "unresolved", "cannot resolve: x"),
            s5.HOST_UNREACHABLE,
            "unresolved",
            "cannot resolve: x",
        ),
        (SessionGone("exit refused hello: unknown-session", hl.UNKNOWN_SESSION), 5, None, None),
        (NotReady("ssh", "refused"), None, "ssh", "ssh: refused"),
    ],
)
def test_code_reason_and_message(
    error: RelayError, code: Optional[int], reason: Optional[str], message: Optional[str]
) -> None:
    assert error.code == code
    if reason is not None:
        assert error.reason == reason
    if message is not None:
        assert str(error) == message


def test_attributes_callers_read_are_kept() -> None:
    gone = SessionGone("exit refused hello: unknown-session", hl.UNKNOWN_SESSION)
    assert gone.reason == "resume-failed"  # its streams' result
    unavailable = SshUnavailable("a: refused", 3.0, True)
    assert (unavailable.retry_after, unavailable.final) == (3.0, True)
    refused = TunnelRefused("hello", hl.BUSY)
    assert (refused.stage, refused.status) == ("hello", hl.BUSY)
    assert ChannelRefused("connect failed").why == "connect failed"
    assert OpenSshError("auth", "x").kind == "auth"
    assert Refusal(s5.NOT_ALLOWED, "denied", "policy: no_rule").why == "policy: no_rule"
    ready = NotReady("exit", "down", final=True)
    assert (ready.hop, ready.why, ready.final) == ("exit", "down", True)
    assert s5.Socks5Error("bad", s5.COMMAND_NOT_SUPPORTED).reply == s5.COMMAND_NOT_SUPPORTED
    # A dial failure keeps the error it classified, for relay check.
    cause = ChannelRefused("administratively prohibited")
    try:
        raise DialFailed("login node cannot reach the exit", "exit-unreachable") from cause
    except DialFailed as exc:
        assert exc.__cause__ is cause


# -- what reaches the wire -------------------------------------------------------------------


class _Policy:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def check(self, address: str, port: int, name: Optional[str] = None) -> Decision:
        return Decision(False, self.reason, None)


async def test_an_exit_refusal_code_is_the_reply_the_worker_gets() -> None:
    policy: Any = _Policy("unspecified")
    with pytest.raises(Refusal) as info:
        await resolve(policy, Metrics("exit"), 1.0, "0.0.0.0", 9, s5.ATYP_IPV4)
    refusal = info.value
    assert (refusal.code, refusal.reason, str(refusal)) == (
        s5.NOT_ALLOWED,
        "denied",
        "policy: unspecified",
    )
    # The exit's session answers the OPEN with the code; the worker decodes that REPLY.
    (frame,) = mux.FrameDecoder().feed(mux.encode_reply(1, refusal.code, b"\x01" + bytes(6)))
    assert isinstance(frame, mux.Reply) and frame.code == s5.NOT_ALLOWED


class _Link:
    """A transport that keeps what is written and closes on request."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass


def _refusing_exit(status: int) -> bytes:
    """The exit's answer to a HELLO it refuses: tunnel method, then the unsigned reply."""
    return bytes((s5.VERSION, hl.METHOD_TUNNEL)) + hl.encode_reply(None, bytes(32), status)


async def test_a_hello_refusal_code_is_the_exit_s_status() -> None:
    carrier = TcpCarrier()
    carrier.connection_made(_Link())  # type: ignore[arg-type]
    carrier.start(carrier_opener(b"k" * 32, "worker-1", 25.0))
    carrier.data_received(_refusing_exit(hl.CLOCK_SKEW))
    with pytest.raises(TunnelRefused) as info:
        await carrier.established
    assert (info.value.code, info.value.reason) == (hl.CLOCK_SKEW, "exit-hello")


async def test_the_dialler_counts_a_refused_hello_with_the_error_s_reason() -> None:
    metrics = Metrics("worker")
    settings: Any = SimpleNamespace(secret=b"k" * 32, key_id="worker-1", heartbeat=25.0)
    dialler = Dialler(settings, metrics, None)
    carrier = TcpCarrier()
    link = _Link()
    carrier.connection_made(link)  # type: ignore[arg-type]
    hello = asyncio.ensure_future(dialler.hello(carrier, timeout=5))
    await asyncio.sleep(0)
    assert link.written  # the first flight went
    carrier.data_received(_refusing_exit(hl.BAD_AUTH))
    with pytest.raises(TunnelRefused):
        await hello
    assert link.closed
    value = metrics.registry.get_sample_value
    assert value("relay_carriers_total", {"result": "refused"}) == 1
    assert value("relay_auth_failures_total", {"reason": "exit-hello"}) == 1


async def test_the_dialler_names_a_broken_hello_failed_and_keeps_its_cause() -> None:
    metrics = Metrics("worker")
    settings: Any = SimpleNamespace(secret=b"k" * 32, key_id="worker-1", heartbeat=25.0)
    dialler = Dialler(settings, metrics, None)
    carrier = TcpCarrier()
    carrier.connection_made(_Link())  # type: ignore[arg-type]
    hello = asyncio.ensure_future(dialler.hello(carrier, timeout=5))
    await asyncio.sleep(0)
    carrier.connection_lost(None)
    with pytest.raises(DialFailed) as info:
        await hello
    assert info.value.reason == "failed" and info.value.code == s5.GENERAL_FAILURE
    assert str(info.value) == "tunnel handshake: carrier closed during handshake: carrier closed"
    assert isinstance(info.value.__cause__, ConnectionError)
    value = metrics.registry.get_sample_value
    assert value("relay_carriers_total", {"result": "failed"}) == 1

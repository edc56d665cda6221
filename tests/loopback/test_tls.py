"""TLS on the exit: the chain (curl and python-socks through worker -> sshd -> TLS exit),
resume over TLS, a worker that refuses an exit with the wrong certificate, a client without
TLS on the TLS port, the documented openssl commands with a real relay-exit process, and
the options' errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from relay.config.loading import load_exit_config, load_worker_config
from relay.config.values import parse_fingerprint
from relay.errors import ConfigError
from relay.exit.daemon import RelayExit
from relay.net.tlslink import (
    TlsClient,
    TlsLink,
    client_context,
    fingerprint,
    server_context,
)
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.worker.daemon import RelayWorker
from tests.support.cutter import Cutter
from tests.support.fixtures import require_root
from tests.support.helpers import (
    KEY_ID,
    PASSWORD,
    SECRET,
    USER,
    Servers,
    echo_handler,
    exit_settings,
    http_handler,
    metric,
    wait_for,
    worker_settings,
)
from tests.support.sshd import Sshd, start_sshd
from tests.support.tlscerts import Pki, make_pki

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def login(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One sshd for the module: the login node every worker here goes through."""
    require_root()
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


def tls_exit(pki: Pki, self_signed: bool = False, **overrides: Any) -> RelayExit:
    issued = pki.self_signed if self_signed else pki.server
    ctx = server_context(issued.cert, issued.key)
    return RelayExit(exit_settings(tls=ctx, heartbeat=0.5, **overrides))


def with_ca(pki: Pki, ca: Optional[Path] = None, name: Optional[str] = None) -> TlsClient:
    return TlsClient(client_context(ca or pki.ca.cert), name)


def with_pin(*pins: bytes) -> TlsClient:
    return TlsClient(client_context(None), None, pins)


def proxy(worker: RelayWorker) -> Proxy:
    return Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")


async def echo_once(worker: RelayWorker, port: int, data: bytes = b"ping\n") -> bytes:
    sock = await proxy(worker).connect("127.0.0.1", port, timeout=20)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readexactly(len(data)), 10)
    finally:
        writer.close()


class Rig:
    """A TLS exit, a worker through the module's sshd, destinations; closed by ``close``."""

    def __init__(self, relay_exit: RelayExit, worker: RelayWorker, servers: Servers) -> None:
        self.exit, self.worker, self.servers = relay_exit, worker, servers

    async def close(self) -> None:
        await self.worker.stop()
        await self.exit.stop()
        await self.servers.close()


async def make_rig(
    pki: Pki, login: Optional[Sshd], tls: Optional[TlsClient], *, self_signed: bool = False,
    exit_tls: bool = True, **worker_overrides: Any,
) -> Rig:  # fmt: skip
    relay_exit = tls_exit(pki, self_signed) if exit_tls else RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(
        worker_settings(login, relay_exit.address, exit_tls=tls, heartbeat=0.5, **worker_overrides)
    )
    await worker.start()
    return Rig(relay_exit, worker, Servers())


@pytest.fixture
async def rig(pki: Pki, login: Sshd) -> AsyncIterator[Rig]:
    r = await make_rig(pki, login, with_ca(pki))
    try:
        yield r
    finally:
        await r.close()


def exit_carrier_tls_versions(relay_exit: RelayExit) -> list[str]:
    return [
        conn.transport.get_extra_info("ssl_object").version()
        for conn in relay_exit.connections
        if isinstance(conn.transport, TlsLink)
    ]


# -- the chain through TLS -----------------------------------------------------------------


async def test_curl_and_python_socks_through_sshd_to_a_tls_exit(rig: Rig, tmp_path: Path) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    http_port = await rig.servers.start(http_handler(payload))
    echo_port = await rig.servers.start(echo_handler)
    out = tmp_path / "file"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "--max-time", "60",
        "--socks5-hostname", f"127.0.0.1:{rig.worker.address[1]}",
        "--proxy-user", f"{USER}:{PASSWORD}",
        "-o", str(out), f"http://127.0.0.1:{http_port}/payload",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(payload).digest()
    # python-socks, and a look at the exit's side of the carrier while the stream is open
    sock = await proxy(rig.worker).connect("127.0.0.1", echo_port, timeout=20)
    reader, writer = await asyncio.open_connection(sock=sock)
    message = os.urandom(300_000)
    writer.write(message)
    assert await asyncio.wait_for(reader.readexactly(len(message)), 20) == message
    versions = exit_carrier_tls_versions(rig.exit)
    assert versions and set(versions) <= {"TLSv1.2", "TLSv1.3"}
    writer.close()
    assert metric(rig.worker.metrics, "relay_carriers_total", result="ok") == 2
    assert metric(rig.worker.metrics, "relay_carriers_total", result="tls-failed") == 0


async def test_pinned_self_signed_exit_in_every_fingerprint_format(pki: Pki, login: Sshd) -> None:
    digest = pki.self_signed.sha256
    relay_exit = tls_exit(pki, self_signed=True)
    await relay_exit.start()
    servers = Servers()
    port = await servers.start(echo_handler)
    try:
        for text in (
            digest.hex(),
            ":".join(f"{b:02X}" for b in digest),
            fingerprint(pki.self_signed.der),
        ):
            cfg_pin = parse_fingerprint(text)
            worker = RelayWorker(
                worker_settings(login, relay_exit.address, exit_tls=with_pin(cfg_pin))
            )
            await worker.start()
            try:
                assert await echo_once(worker, port) == b"ping\n"
            finally:
                await worker.stop()
    finally:
        await relay_exit.stop()
        await servers.close()


async def test_server_name_checks_a_name_when_dialling_an_address(pki: Pki, login: Sshd) -> None:
    good = await make_rig(pki, login, with_ca(pki, name="exit.test"))
    try:
        port = await good.servers.start(echo_handler)
        assert await echo_once(good.worker, port) == b"ping\n"
    finally:
        await good.close()


async def test_reload_swaps_the_certificate_for_new_connections(pki: Pki, login: Sshd) -> None:
    relay_exit = tls_exit(pki)
    await relay_exit.start()
    servers = Servers()
    port = await servers.start(echo_handler)
    worker = RelayWorker(
        worker_settings(
            login, relay_exit.address, exit_tls=with_pin(pki.self_signed.sha256),
            no_optimistic=True,
        )
    )  # fmt: skip
    await worker.start()
    try:
        with pytest.raises(ProxyError):
            await echo_once(worker, port)
        settings = relay_exit.settings
        fresh = server_context(pki.self_signed.cert, pki.self_signed.key)
        fresh_fingerprint = fingerprint(pki.self_signed.der)
        relay_exit.reload(settings.secrets, settings.policy, fresh, fresh_fingerprint)
        # the worker's last attempt failed: the next stream that asks (at most one a second)
        # makes it try again, and that one gets through
        assert await echoes_soon(worker, port)
        assert relay_exit.settings.tls_fingerprint == fingerprint(pki.self_signed.der)
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()


async def echoes_soon(worker: RelayWorker, port: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(ProxyError):
            return await echo_once(worker, port) == b"ping\n"
        await asyncio.sleep(0.2)
    return False


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("wrong-fingerprint", "matches no pinned fingerprint"),
        ("wrong-ca", "certificate not accepted"),
        ("wrong-name", "Hostname mismatch"),
    ],
)
async def test_worker_refuses_an_exit_with_the_wrong_certificate(
    pki: Pki, login: Sshd, how: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    tls = {
        "wrong-fingerprint": with_pin(pki.self_signed.sha256),
        "wrong-ca": with_ca(pki, pki.other_ca.cert),
        "wrong-name": with_ca(pki, name="other.test"),
    }[how]
    rig = await make_rig(pki, login, tls, no_optimistic=True)  # refusals as SOCKS5 replies
    caplog.set_level(logging.INFO, logger="relay")
    try:
        port = await rig.servers.start(echo_handler)
        with pytest.raises(ProxyError) as info:
            await proxy(rig.worker).connect("127.0.0.1", port, timeout=20)
        assert info.value.error_code == s5.GENERAL_FAILURE
        worker_metrics = rig.worker.metrics
        assert metric(worker_metrics, "relay_carriers_total", result="tls-failed") == 1
        assert metric(worker_metrics, "relay_auth_failures_total", reason="exit-tls") == 1
        assert metric(worker_metrics, "relay_streams_total", result="refused") == 1
        assert metric(rig.exit.metrics, "relay_streams_total", result="ok") == 0
        warning = [r for r in caplog.records if "TLS certificate is not the one" in r.message]
        assert warning and why in str(warning[0].__dict__.get("fields"))
        refused = [r for r in caplog.records if r.message == "stream refused"]
        assert refused and "--exit-fingerprint" in str(refused[0].__dict__.get("fields"))
        # the exit saw a TLS handshake that went nowhere and counted it; nothing is left open
        assert await wait_for(lambda: rig.exit.handshakes == 0)
        assert not rig.exit.pumps
    finally:
        await rig.close()


async def test_plain_client_on_the_tls_port_gets_a_clean_failure_and_is_counted(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    relay_exit = tls_exit(pki)
    await relay_exit.start()
    try:
        flight = (
            b"\x05\x01\x80"
            + hl.encode_hello(SECRET, KEY_ID, 0, os.urandom(16))
            + s5.Socks5Client.request(s5.CMD_CONNECT, "127.0.0.1", 9)
        )
        for first in (flight, b"\x05\x01\x02", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            reader, writer = await asyncio.open_connection(*relay_exit.address)
            writer.write(first)
            answer = await asyncio.wait_for(reader.read(), 5)  # closed at once, no hang
            assert not answer.startswith(b"\x05")  # not a SOCKS5 answer: nothing leaks
            writer.close()
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="tls") == 3
        assert metric(relay_exit.metrics, "relay_auth_failures_total", reason="bad-mac") == 0
        lines = [r for r in caplog.records if r.message == "handshake failed"]
        assert any("SOCKS5 client without TLS" in str(r.__dict__.get("fields")) for r in lines)
        assert relay_exit.handshakes == 0 and not relay_exit.connections
    finally:
        await relay_exit.stop()


async def test_tls_and_plain_mismatch_both_ways_fail_clearly(pki: Pki, login: Sshd) -> None:
    # a worker without TLS configured, against a TLS exit
    plain_worker = await make_rig(pki, login, None, no_optimistic=True)
    try:
        port = await plain_worker.servers.start(echo_handler)
        with pytest.raises(ProxyError):
            await proxy(plain_worker.worker).connect("127.0.0.1", port, timeout=20)
        assert metric(plain_worker.worker.metrics, "relay_carriers_total", result="failed") == 1
        assert metric(plain_worker.exit.metrics, "relay_protocol_errors_total", stage="tls") == 1
    finally:
        await plain_worker.close()
    # a TLS worker against a plain exit
    tls_worker = await make_rig(pki, login, with_ca(pki), exit_tls=False, no_optimistic=True)
    try:
        port = await tls_worker.servers.start(echo_handler)
        with pytest.raises(ProxyError):
            await proxy(tls_worker.worker).connect("127.0.0.1", port, timeout=20)
        assert metric(tls_worker.worker.metrics, "relay_carriers_total", result="tls-failed") == 1
        assert metric(tls_worker.worker.metrics, "relay_auth_failures_total",
                      reason="exit-tls") == 0  # fmt: skip
    finally:
        await tls_worker.close()


# -- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["ssh", "direct"])
async def test_streams_resume_over_tls_after_resets_and_black_holes(
    pki: Pki, login: Sshd, via: str
) -> None:
    relay_exit = tls_exit(pki)
    await relay_exit.start()
    cutter = Cutter(relay_exit.address)
    await cutter.start()
    worker = RelayWorker(worker_settings(
        login if via == "ssh" else None, cutter.address, exit_tls=with_ca(pki, name="exit.test"),
        heartbeat=0.5, reconnect_max=0.5,
    ))  # fmt: skip
    await worker.start()
    servers = Servers()
    try:
        port = await servers.start(echo_handler)
        sock = await proxy(worker).connect("127.0.0.1", port, timeout=20)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"open?\n")  # the carrier is up once the first echo is back
        assert await asyncio.wait_for(reader.readline(), 20) == b"open?\n"
        sent = hashlib.sha256()
        got = hashlib.sha256()
        for i, cut in enumerate(("reset", "blackhole", "reset")):
            # the carrier breaks, then a message goes in: it arrives once the stream resumed
            assert (cutter.reset_all() if cut == "reset" else cutter.blackhole_all()) >= 1
            message = os.urandom(200_000 + i)
            writer.write(message)
            sent.update(message)
            got.update(await asyncio.wait_for(reader.readexactly(len(message)), 20))
            # at least one move per fault: more when the carrier the stream moved to was
            # taken by the same black hole
            assert await wait_for(
                lambda n=i + 1: metric(worker.metrics, "relay_resumes_total", result="ok") >= n
            )
        assert got.digest() == sent.digest()
        assert metric(relay_exit.metrics, "relay_resumes_total", result="ok") >= 3
        assert exit_carrier_tls_versions(relay_exit)
        writer.close()
    finally:
        await worker.stop()
        await cutter.close()
        await relay_exit.stop()
        await servers.close()


# -- the documented commands, a real relay-exit process ------------------------------------------

# Kept in step with docs/SECURITY.md ("Port 443 with TLS").
OPENSSL_CERT = (
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825"
    " -subj /CN=exit.example.org -addext subjectAltName=DNS:exit.example.org,IP:127.0.0.1"
    " -keyout exit.key -out exit.crt"
)
OPENSSL_FINGERPRINT = "openssl x509 -in exit.crt -noout -fingerprint -sha256"


def test_security_doc_shows_the_commands_tested_here() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md").read_text()
    assert OPENSSL_CERT in " ".join(doc.replace("\\\n", " ").split())
    assert OPENSSL_FINGERPRINT in doc


async def test_documented_openssl_commands_with_the_relay_exit_command(tmp_path: Path) -> None:
    subprocess.run(OPENSSL_CERT.split(), cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "exit.key").chmod(0o600)
    out = subprocess.run(
        OPENSSL_FINGERPRINT.split(), cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout
    pin = parse_fingerprint(out)
    keys = tmp_path / "exit.keys"
    keys.write_text(f"{KEY_ID} {SECRET.decode()}\n")
    keys.chmod(0o600)
    servers = Servers()
    echo_port = await servers.start(echo_handler)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "relay-exit"), "--listen", f"127.0.0.1:{port}", "--keys", str(keys),
         "--tls-cert", str(tmp_path / "exit.crt"), "--tls-key", str(tmp_path / "exit.key"),
         "--allow", "127.0.0.1/32:*", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = await asyncio.to_thread(_line_with, proc.stderr, '"listening"')
        logged = re.search(r'"tls": "(SHA256:[^"]+)"', line)
        assert logged and parse_fingerprint(logged.group(1)) == pin
        worker = RelayWorker(worker_settings(None, ("127.0.0.1", port), exit_tls=with_pin(pin)))
        await worker.start()
        try:
            assert await echo_once(worker, echo_port) == b"ping\n"
        finally:
            await worker.stop()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        await servers.close()


def _line_with(stream: Any, needle: str) -> str:
    line = stream.readline()
    while line and needle not in line:
        line = stream.readline()
    return str(line)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- options -------------------------------------------------------------------------------------


def run(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / command), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_exit_tls_options_are_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    keys = tmp_path / "exit.keys"
    keys.write_text(f"{KEY_ID} {SECRET.decode()}\n")
    keys.chmod(0o600)
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server.key.read_bytes())
    loose.chmod(0o640)
    cert, key = str(pki.server.cert), str(pki.server.key)
    cases = [
        (["--tls-cert", cert], "--tls-cert needs --tls-key"),
        (["--tls-key", key], "--tls-key needs --tls-cert"),
        (["--tls-cert", cert, "--tls-key", str(loose)], "readable by group"),
        (["--tls-cert", cert, "--tls-key", str(pki.self_signed.key)], "cannot use"),
    ]
    for extra, message in cases:
        result = run("relay-exit", "--keys", str(keys), *extra)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        assert "PRIVATE KEY" not in result.stderr
    cfg = load_exit_config(["--keys", str(keys), "--tls-cert", cert, "--tls-key", key])
    assert (cfg["tls_cert"], cfg["tls_key"]) == (pki.server.cert, pki.server.key)


def test_worker_tls_options(pki: Pki, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET.decode())
    secret.chmod(0o600)
    base = ["--no-socks-auth", "--exit", "exit.example.org:443", "--key-id", KEY_ID,
            "--secret-file", str(secret)]  # fmt: skip
    digest = pki.server.sha256
    cfg = load_worker_config([*base, "--exit-fingerprint", digest.hex(),
                              "--exit-fingerprint", "SHA256:" + "A" * 43])  # fmt: skip
    assert cfg["exit_fingerprint"] == (digest, bytes(32)) and cfg["exit_ca"] is None
    cfg = load_worker_config([*base, "--exit-ca", str(pki.ca.cert), "--exit-server-name", "x.org"])
    assert cfg["exit_ca"] == pki.ca.cert and cfg["exit_server_name"] == "x.org"
    for extra, message in [
        (["--exit-fingerprint", "abc"], "--exit-fingerprint: expected a SHA-256"),
        (["--exit-server-name", "x.org"], "missing --exit-ca"),
        (["--exit-ca", str(tmp_path / "nope.pem")], "--exit-ca: cannot read"),
        (["--exit-server-name", "bad name!", "--exit-ca", str(pki.ca.cert)], "not a valid"),
        (["--upstream", "socks5://127.0.0.1:1080", "--exit-ca", str(pki.ca.cert)], "not --ups"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_worker_config([*base, *extra])
    result = run("relay-worker", *base, "--exit-ca", str(pki.server.key))
    assert result.returncode == 2 and "--exit-ca" in result.stderr


# -- relay check and the wrapper's readiness gate speak TLS as the worker does ------------------


async def test_relay_check_and_wrapper_hello_through_a_tls_exit(pki: Pki, login: Sshd) -> None:
    from glidein_wrapper.ready import NotReady, hello_check
    from relay.tools.check import FAIL, OK, check_chain

    relay_exit = tls_exit(pki)
    await relay_exit.start()
    servers = Servers()
    try:
        port = await servers.start(echo_handler)
        good = worker_settings(login, relay_exit.address, exit_tls=with_ca(pki))
        hops = await check_chain(good, [("127.0.0.1", port)])
        assert [(h.name, h.status) for h in hops] == [
            ("ssh", OK), ("tcp", OK), ("hello", OK), ("connect", OK), ("heartbeat", OK),
        ]  # fmt: skip
        assert "TLS certificate verified" in hops[1].detail
        bad = worker_settings(login, relay_exit.address, exit_tls=with_pin(bytes(32)))
        hops = await check_chain(bad, [("127.0.0.1", port)])
        tcp = next(h for h in hops if h.name == "tcp")
        assert tcp.status == FAIL and "not accepted" in tcp.cause and "fingerprint" in tcp.fix
        for settings, ok in ((good, True), (bad, False)):
            worker = RelayWorker(settings)
            try:
                if ok:
                    await hello_check(worker, *relay_exit.address)
                else:
                    with pytest.raises(NotReady, match="pinned fingerprint"):
                        await hello_check(worker, *relay_exit.address)
            finally:
                await worker.stop()
    finally:
        await relay_exit.stop()
        await servers.close()

"""TLS on links that are not sockets: ``ssl.SSLObject`` over memory BIOs.

The worker's carriers run through an SSH direct-tcpip channel, which asyncio's own TLS cannot
wrap, so TLS is done here by hand, the same way on both ends:

- :class:`TlsEngine` is the sans-IO core: ciphertext in, plaintext out, and the reverse; it
  knows nothing of sockets, channels or event loops (tests drive two of them against each
  other in memory).
- :class:`TlsLink` sits between a raw link (an SSH channel or a TCP transport) and the
  protocol that speaks the tunnel: to the raw link it is the protocol (``data_received`` and
  friends), to the tunnel protocol it is the transport (``write``, ``writelines``, ``close``,
  ``abort``, ``pause_reading``, ``resume_reading``, ``get_extra_info``). The tunnel protocol
  and its HMAC authentication run unchanged inside.

The exit wraps every accepted connection (``eager``: its protocol exists from the first byte,
so the handshake timeout and the handshake limit cover the TLS handshake too); the worker
finishes the TLS handshake before it starts the tunnel handshake, so a certificate that does
not verify is reported as such, not as a broken carrier.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import ssl
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from relay.errors import ConfigError
from relay.proto import socks5 as s5
from relay.proto.errors import RelayError

__all__ = [
    "TlsClient",
    "TlsEngine",
    "TlsError",
    "TlsLink",
    "TlsVerifyError",
    "cert_fingerprint",
    "client_context",
    "connect_tls",
    "fingerprint",
    "server_context",
]

READ_CHUNK = 256 * 1024
"""Most plaintext handed to the protocol in one call (one raw read is at most this much)."""


class TlsError(RelayError, ConnectionError):
    """TLS failed: a bad handshake, a broken record, or a peer that does not speak TLS.

    ``reason`` is the worker's relay_carriers_total result; a stream waiting for the carrier
    is refused with a general failure."""

    code = s5.GENERAL_FAILURE
    reason = "tls-failed"


class TlsVerifyError(TlsError):
    """The peer's certificate was not accepted (CA, host name or pinned fingerprint).

    ``reason`` is the worker's relay_auth_failures_total reason."""

    reason = "exit-tls"


def _describe(exc: ssl.SSLError) -> str:
    """The useful part of an OpenSSL error: 'wrong version number', not the C file name."""
    message = getattr(exc, "verify_message", None)
    if message:
        return str(message)
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


_TLS_HANDSHAKE_RECORD = 0x16


def _first_byte(byte: int) -> str:
    """What a client that does not speak TLS probably is, from its first byte."""
    if byte == 0x05:
        return "first byte 0x05, a SOCKS5 client without TLS"
    if 0x41 <= byte <= 0x5A:
        return f"first byte {chr(byte)!r}, plain text (HTTP?)"
    return f"first byte 0x{byte:02x}"


def fingerprint(der: bytes) -> str:
    """OpenSSH-style ``SHA256:base64`` of a certificate's DER bytes."""
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


_PEM_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----\s+.*?-----END CERTIFICATE-----", re.DOTALL)


def cert_fingerprint(path: Path) -> str:
    """Fingerprint of the first certificate in a PEM file (the one a server presents)."""
    match = _PEM_CERT_RE.search(path.read_text(errors="replace"))
    if match is None:
        raise ValueError(f"{path}: no PEM certificate")
    return fingerprint(ssl.PEM_cert_to_DER_cert(match.group(0)))


class _Encrypted(Exception):
    """Raised by the password callback: keys with a passphrase cannot be loaded unattended."""


def _no_password() -> bytes:
    raise _Encrypted


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context with the exit's certificate chain and key; ConfigError if bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation costs the server a handshake each: refuse it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except _Encrypted:
        raise ConfigError(
            f"--tls-key: {key} is encrypted; the exit needs a key without passphrase"
        ) from None
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise ConfigError(
                f"--tls-cert/--tls-key: cannot use {cert} with {key}: {_describe(exc)}"
                " (is the key the certificate's, both PEM?)"
            ) from None
        raise ConfigError(
            f"--tls-cert/--tls-key: cannot read {exc.filename or cert}: {exc.strerror or exc}"
        ) from None
    return ctx


def client_context(ca: Optional[Path]) -> ssl.SSLContext:
    """TLS 1.2+ client context: verify against ``ca``, or (pin only) accept any chain.

    Without a CA the certificate is checked against pinned fingerprints after the handshake
    (:class:`TlsEngine`), so no chain, name or date is needed: the pin is the identity.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"--exit-ca: {ca}: no usable certificate ({_describe(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"--exit-ca: cannot read {ca}: {exc.strerror or exc}") from None
    return ctx


class TlsClient(NamedTuple):
    """How the worker checks an exit: context (with or without CA), name, pinned digests."""

    context: ssl.SSLContext
    server_name: Optional[str] = None
    pins: tuple[bytes, ...] = ()

    def engine(self, host: str) -> TlsEngine:
        return TlsEngine(
            self.context,
            server_side=False,
            server_hostname=self.server_name or host,
            pins=self.pins,
        )


class TlsEngine:
    """Sans-IO TLS: :meth:`feed` ciphertext, :meth:`read` plaintext, :meth:`encrypt`,
    and send whatever :meth:`outgoing` returns after each call."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: Optional[str] = None,
        pins: Iterable[bytes] = (),
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self.server_side = server_side
        self.pins = tuple(pins)
        self.handshake_done = False
        self.peer_closed = False
        self.failed: Optional[TlsError] = None
        self._seen = False

    def _fail(self, exc: TlsError) -> TlsError:
        self.failed = exc
        return exc

    def start(self) -> bytes:
        """The first bytes to send: a client's ClientHello (nothing for a server)."""
        if not self.server_side:
            self._handshake()
        return self.outgoing()

    def feed(self, data: bytes) -> bool:
        """Ciphertext from the peer; True when it completed the handshake just now."""
        if self.failed is not None:
            raise self.failed
        if self.server_side and not self._seen and data:
            self._seen = True
            if data[0] != _TLS_HANDSHAKE_RECORD:
                # OpenSSL would wait for a whole record header; a SOCKS5 greeting is 3 bytes.
                raise self._fail(TlsError(f"not TLS: {_first_byte(data[0])}"))
        self._incoming.write(data)
        if self.handshake_done:
            return False
        return self._handshake()

    def _handshake(self) -> bool:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLCertVerificationError as exc:
            raise self._fail(
                TlsVerifyError(f"certificate not accepted: {_describe(exc)}")
            ) from None
        except ssl.SSLError as exc:
            raise self._fail(TlsError(f"TLS handshake failed: {_describe(exc)}")) from None
        if self.pins:
            der = self.sslobj.getpeercert(binary_form=True)
            if der is None or hashlib.sha256(der).digest() not in self.pins:
                self._outgoing.read()  # not even our Finished goes to an impostor
                shown = fingerprint(der) if der else "none"
                raise self._fail(
                    TlsVerifyError(f"certificate fingerprint {shown} matches no pinned fingerprint")
                )
        self.handshake_done = True
        return True

    def read(self, limit: int = READ_CHUNK) -> bytes:
        """Plaintext available now (b"" if none); sets :attr:`peer_closed` on close_notify."""
        if self.failed is not None:
            raise self.failed
        chunks: list[bytes] = []
        total = 0
        while total < limit:
            try:
                chunk = self.sslobj.read(min(65536, limit - total))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except ssl.SSLError as exc:
                raise self._fail(TlsError(f"TLS error: {_describe(exc)}")) from None
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
            total += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def encrypt(self, data: Any) -> bytes:
        """Ciphertext for ``data`` (bytes-like), to be sent as is."""
        if self.failed is not None:
            raise self.failed
        view = memoryview(data)
        try:
            while view:
                written = self.sslobj.write(view)
                view = view[written:]
        except ssl.SSLError as exc:
            raise self._fail(TlsError(f"TLS error: {_describe(exc)}")) from None
        return self._outgoing.read()

    def outgoing(self) -> bytes:
        return self._outgoing.read()

    def shutdown(self) -> bytes:
        """Our close_notify; nobody waits for the peer's (the link closes right after)."""
        with contextlib.suppress(ssl.SSLError):
            self.sslobj.unwrap()
        return self._outgoing.read()


def _retrieve(future: asyncio.Future[None]) -> None:
    """Nobody may await a link's handshake future (the exit): do not warn about it."""
    if not future.cancelled():
        future.exception()


class TlsLink:
    """The transport of ``inner`` and the protocol of a raw link, with TLS in between.

    ``eager``: ``inner.connection_made`` is called at once (the exit: its handshake timer
    then covers TLS too, and a failed TLS handshake reaches ``inner.tls_failed(exc)``);
    otherwise only when the TLS handshake succeeded (the worker awaits :attr:`handshake`).
    """

    def __init__(self, engine: TlsEngine, inner: Any, *, eager: bool) -> None:
        self.engine = engine
        self.inner = inner
        self.raw: Any = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake.add_done_callback(_retrieve)
        self._eager = eager
        self._connected = False
        self._reading = True
        self._closing = False
        self._delivering = False
        self._eof_delivered = False
        self._early: list[bytes] = []

    # -- the raw link's protocol ----------------------------------------------------------
    def connection_made(self, raw: Any) -> None:
        self.raw = raw
        if self._eager:
            self._connect_inner()
        try:
            out = self.engine.start()
        except TlsError as exc:
            self._failed(exc)
            return
        if out:
            raw.write(out)

    def session_started(self) -> None:
        """asyncssh calls this after connection_made; nothing to do."""

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if self._closing:
            return
        engine = self.engine
        try:
            completed = engine.feed(data)
        except TlsError as exc:
            self._failed(exc)
            return
        self._flush()
        if completed:
            self._handshake_ok()
        if engine.handshake_done:
            self._deliver()

    def eof_received(self) -> bool:
        if not self.engine.handshake_done:
            self._failed(TlsError("peer closed the connection during the TLS handshake"))
            return False
        self._deliver(force=True)
        if self._connected and not self._closing and not self._eof_delivered:
            self._eof_delivered = True
            return bool(self.inner.eof_received())
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._closing = True
        if not self.handshake.done():
            why = f": {exc}" if exc else ""
            self.handshake.set_exception(TlsError(f"connection lost during the TLS handshake{why}"))
        if self._connected:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._connected:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._connected:
            self.inner.resume_writing()

    # -- the inner protocol's transport ---------------------------------------------------
    def write(self, data: Any) -> None:
        if self._closing or not data:
            return
        if not self.engine.handshake_done:
            self._early.append(bytes(data))
            return
        self._write_now(data)

    def writelines(self, pieces: Iterable[Any]) -> None:
        self.write(b"".join(pieces))

    def close(self) -> None:
        if self._closing or self.raw is None:
            return
        self._closing = True
        if self.engine.handshake_done and self.engine.failed is None:
            out = self.engine.shutdown()
            if out:
                self.raw.write(out)
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw is None or bool(self.raw.is_closing())

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self.raw is not None and not self._closing:
                self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        if self.engine.handshake_done:
            self._deliver()
        if self._reading and not self._closing and self.raw is not None:
            self.raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.engine.sslobj
        if name == "cipher":
            return self.engine.sslobj.cipher() if self.engine.handshake_done else default
        if name == "peercert":
            return self.engine.sslobj.getpeercert() if self.engine.handshake_done else default
        if self.raw is None:
            return default
        return self.raw.get_extra_info(name, default)

    # -- internals ------------------------------------------------------------------------
    def _connect_inner(self) -> None:
        self._connected = True
        self.inner.connection_made(self)

    def _handshake_ok(self) -> None:
        if not self._connected:
            self._connect_inner()
        if self._early and not self._closing:
            early, self._early = b"".join(self._early), []
            self._write_now(early)
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _write_now(self, data: Any) -> None:
        try:
            out = self.engine.encrypt(data)
        except TlsError as exc:
            self._failed(exc)
            raise
        if out:
            self.raw.write(out)

    def _flush(self) -> None:
        out = self.engine.outgoing()
        if out and self.raw is not None and not self._closing:
            self.raw.write(out)

    def _failed(self, exc: TlsError) -> None:
        """Send what TLS has to say (an alert), tell whoever waits, close."""
        if self._closing:
            return
        self._flush()
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        hook = getattr(self.inner, "tls_failed", None) if self._connected else None
        if hook is not None:
            hook(exc)
        self._closing = True
        if self.raw is not None:
            self.raw.close()

    def _deliver(self, force: bool = False) -> None:
        """Hand decrypted bytes to the inner protocol while it wants them."""
        if self._delivering or not self._connected:
            return
        self._delivering = True
        try:
            while (self._reading or force) and not self._closing:
                try:
                    data = self.engine.read()
                except TlsError as exc:
                    self._failed(exc)
                    return
                self._flush()
                if data:
                    self.inner.data_received(data)
                if self.engine.peer_closed and not self._eof_delivered and not self._closing:
                    self._eof_delivered = True
                    if not self.inner.eof_received():
                        self.close()
                    return
                if not data:
                    return
        finally:
            self._delivering = False


RawOpener = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Opens the raw link with a protocol factory: ``loop.create_connection`` or asyncssh's
``conn.create_connection`` with host and port bound."""


async def connect_tls(
    open_raw: RawOpener,
    inner_factory: Callable[[], Any],
    tls: TlsClient,
    host: str,
    timeout: float,
) -> tuple[TlsLink, Any]:
    """Open a raw link, finish the TLS handshake within ``timeout``; (link, inner protocol).

    Raises :class:`TlsVerifyError` for a certificate that is not accepted, :class:`TlsError`
    for other TLS failures, and whatever ``open_raw`` raises.
    """
    links: list[TlsLink] = []

    def factory() -> TlsLink:
        link = TlsLink(tls.engine(host), inner_factory(), eager=False)
        links.append(link)
        return link

    await open_raw(factory)
    link = links[0]
    try:
        await asyncio.wait_for(link.handshake, timeout)
    except asyncio.TimeoutError:
        link.abort()
        raise TlsError(f"TLS handshake not finished within {timeout:g}s") from None
    except BaseException:
        link.abort()
        raise
    return link, link.inner

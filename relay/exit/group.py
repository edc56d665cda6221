"""One process of a ``relay-exit --workers N`` group: its place in the group (given by the
supervisor in the environment), the handoff channels to its siblings and the control socket
to the supervisor. The decisions (who owns a connection, the message format) are in
:mod:`relay.proto.handoff`; this is the socket glue around them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from relay.metrics import Metrics
from relay.proto import ProtocolError
from relay.proto import handoff as ho

log = logging.getLogger("relay.exit")

GROUP_ENV = "RELAY_EXIT_GROUP"
"""Environment variable through which the supervisor tells a process its place."""

READY = b"ready\n"


@dataclass
class GroupPlace:
    """What the supervisor tells process ``index``; the numbers are inherited descriptors."""

    index: int
    processes: int
    port: int
    inbox: int
    peers: list[int] = field(default_factory=list)  # one per process, -1 for this one
    control: int = -1
    metrics_path: str = ""

    def to_env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls, text: str) -> GroupPlace:
        try:
            doc = json.loads(text)
            place = cls(**doc)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{GROUP_ENV} is not a group place: {exc}") from None
        if not 0 <= place.index < place.processes <= ho.MAX_PROCESSES:
            raise ValueError(f"{GROUP_ENV}: index {place.index} of {place.processes} processes")
        if len(place.peers) != place.processes:
            raise ValueError(f"{GROUP_ENV}: {len(place.peers)} peers for {place.processes}")
        return place


Adopt = Callable[[socket.socket, ho.Handoff], None]


class Group:
    """The handoff channels of one process: send a connection to a sibling, adopt the ones
    siblings send here."""

    def __init__(self, place: GroupPlace, metrics: Metrics) -> None:
        self.place = place
        self.index = place.index
        self.processes = place.processes
        self.metrics = metrics
        self._inbox = socket.socket(fileno=place.inbox)
        self._inbox.setblocking(False)
        self._peers: list[Optional[socket.socket]] = []
        for fd in place.peers:
            peer = None if fd < 0 else socket.socket(fileno=fd)
            if peer is not None:
                peer.setblocking(False)
            self._peers.append(peer)
        self._control = socket.socket(fileno=place.control) if place.control >= 0 else None
        self._adopt: Optional[Adopt] = None

    def start(self, adopt: Adopt) -> None:
        self._adopt = adopt
        asyncio.get_running_loop().add_reader(self._inbox.fileno(), self._readable)

    def owner(self, is_resume: bool, nonce: bytes, session_id: bytes) -> int:
        return ho.owner(is_resume, nonce, session_id, self.index, self.processes)

    def new_session_id(self) -> bytes:
        return ho.new_session_id(self.index, self.processes, os.urandom)

    def send(self, target: int, kind: int, sent: int, data: bytes, fd: int) -> bool:
        """Pass the connection ``fd`` with what was read from it; False if it could not go
        (the caller then closes it)."""
        name = ho.KIND_NAMES[kind]
        peer = self._peers[target] if 0 <= target < len(self._peers) else None
        try:
            if peer is None:
                raise OSError(f"no channel to worker {target}")
            message = ho.encode(kind, self.index, sent, data)
            socket.send_fds(peer, [message], [fd])
        except (OSError, ValueError) as exc:
            self.metrics.handoffs.labels(name, "failed").inc()
            log.warning(
                "cannot hand a connection to its worker; closing it",
                extra={"fields": {"to": target, "kind": name, "why": str(exc)}},
            )
            return False
        self.metrics.handoffs.labels(name, "sent").inc()
        return True

    def _readable(self) -> None:
        while True:
            try:
                message, fds, flags, _ = socket.recv_fds(self._inbox, ho.MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("handoff inbox failed: %s", exc)
                asyncio.get_running_loop().remove_reader(self._inbox.fileno())
                return
            if not message and not fds:
                return
            self._received(message, fds, flags)

    def _received(self, message: bytes, fds: list[int], flags: int) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(socks) != 1:
                raise ProtocolError(f"handoff with {len(socks)} descriptor(s), flags {flags:#x}")
            sock = socks[0]
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
                socket.AF_UNIX,  # a TLS carrier's plaintext, see PlaintextRelay
            ):
                raise ProtocolError("handoff descriptor is not a stream socket")
            handoff = ho.decode(message)
        except ProtocolError as exc:
            self.metrics.protocol_errors.labels("handoff").inc()
            log.warning("bad handoff message; closing its connection: %s", exc)
            for s in socks:
                s.close()
            return
        sock.setblocking(False)
        assert self._adopt is not None
        self._adopt(sock, handoff)

    # -- control socket to the supervisor -------------------------------------------------
    def ready(self) -> None:
        """Tell the supervisor this process listens."""
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.sendall(READY)

    def watch_supervisor(self, gone: Callable[[], None]) -> None:
        """Call ``gone`` when the supervisor's end of the control socket closes."""
        control = self._control
        if control is None:
            return
        control.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = control.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(control.fileno())
                log.warning("supervisor gone; stopping")
                gone()

        loop.add_reader(control.fileno(), readable)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._inbox.fileno())
        with contextlib.suppress(Exception):
            if self._control is not None:
                asyncio.get_running_loop().remove_reader(self._control.fileno())


class PlaintextRelay:
    """A TLS carrier whose session another process owns: TLS cannot be passed on, so this
    process keeps it and carries the plaintext to the owner over a local socket pair.

    It is the TLS link's inner protocol; :class:`_OwnerSide` is the pair's end here. Each side
    stops reading while the other cannot write, so neither buffers without bound.
    """

    def __init__(self, link: Any, pair_end: socket.socket, on_done: Callable[[], None]) -> None:
        self.link = link
        self.local: Optional[asyncio.Transport] = None
        self._pending: list[bytes] = []
        self._eof = False
        self._on_done = on_done
        self._done = False
        self._pair_end = pair_end
        link.inner = self
        link.pause_reading()  # until the pair's end is connected
        task = asyncio.ensure_future(
            asyncio.get_running_loop().connect_accepted_socket(lambda: _OwnerSide(self), pair_end)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._pair_end.close()
            self.link.abort()
            self.finish()
            return
        pending, self._pending = self._pending, []
        if self.local is None or self.local.is_closing():
            return
        if self._done:  # the TLS side went away while the pair was being connected
            self.local.close()
            return
        self.local.writelines(pending)
        if self._eof:
            self.local.write_eof()
        self.link.resume_reading()

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._on_done()

    # -- as the TLS link's inner protocol: the worker's side -------------------------------
    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.local is None:
            self._pending.append(data)
        else:
            self.local.write(data)

    def eof_received(self) -> bool:
        if self.local is None:
            self._eof = True
        elif self.local.can_write_eof():
            self.local.write_eof()
        return True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.local is not None:
            self.local.abort() if exc else self.local.close()
        self.finish()

    def tls_failed(self, exc: Exception) -> None:
        if self.local is not None:
            self.local.abort()

    def pause_writing(self) -> None:
        if self.local is not None:
            self.local.pause_reading()

    def resume_writing(self) -> None:
        if self.local is not None:
            self.local.resume_reading()


class _OwnerSide(asyncio.Protocol):
    """This process's end of the socket pair to the owner: the owner's bytes go out in TLS."""

    def __init__(self, relay: PlaintextRelay) -> None:
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay.local = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.relay.link.write(data)

    def eof_received(self) -> bool:
        self.relay.link.close()  # TLS has no half-close of its own; the owner is done
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        link = self.relay.link
        link.abort() if exc else link.close()
        self.relay.finish()

    def pause_writing(self) -> None:
        self.relay.link.pause_reading()

    def resume_writing(self) -> None:
        self.relay.link.resume_reading()

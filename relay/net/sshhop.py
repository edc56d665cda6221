"""The SSH hop: a few long-lived connections ("slots") to the login nodes, shared by every
carrier; one slot unless ``--ssh-connections`` asks for more.

Each connection is asyncssh's (in-process) or an ``ssh`` process (relay.openssh). More than
one lets several sshd processes on the login node (and ssh processes on the node) share the
crypto of bulk traffic: carrier k of an exit rides slot k mod N (:func:`slot_for`).

JSC treats bursts of ssh logins as an intrusion, so the worker keeps its connections open,
tries the login nodes in failover order, and never hammers them when they fail: every login
of every slot takes a token of the same per-login-node :class:`ConnectBudget`.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import asyncssh

from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.loopbound import LoopBound
from relay.net.openssh import CIPHERS, OpenSshConnection, OpenSshError
from relay.net.sockopts import QUICKACK_BELOW, quickack
from relay.proto import socks5 as s5
from relay.proto.errors import RelayError

log = logging.getLogger("relay.ssh")

Connection = Union[asyncssh.SSHClientConnection, OpenSshConnection]
"""A login connection; both kinds offer create_connection(), close() and wait_closed()."""

_OPENSSH_HINTS = {
    "host-key": "host key not verifiable ({}): check --known-hosts or ~/.ssh/known_hosts",
    "auth": "permission denied ({}): the login node did not accept the key",
    "missing": "{} (install OpenSSH's client or use --ssh-client asyncssh)",
}


class Login(NamedTuple):
    user: Optional[str]
    host: str
    port: int

    def __str__(self) -> str:
        return (self.user + "@" if self.user else "") + format_hostport(self.host, self.port)


class BatchedWrites:
    """The transport asyncssh writes to: the SSH packets of one loop callback go out as one.

    asyncssh hands every SSH packet (at most 32 KiB of channel data with sshd) to its
    transport with a write() of its own, which is one send() each. Collected until the end
    of the callback and written with one writelines(), a bulk upload costs a fraction of
    the system calls, and a grid tick's heartbeats for many streams leave in one segment.
    asyncssh uses only write(), abort() and get_extra_info() of its transport.
    """

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for data in chunks:
            self.write(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self.transport.is_closing():
            if len(pending) == 1:
                self.transport.write(pending[0])
            else:
                self.transport.writelines(pending)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.flush()
        self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return int(self.transport.get_write_buffer_size()) + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _LoginLink(asyncio.Protocol):
    """Sits between the socket and asyncssh's connection: batches writes, ACKs small reads.

    sshd sends on a non-interactive SSH connection without TCP_NODELAY, so a small packet
    (a handshake answer, a channel confirmation, a PONG behind a FIN) waits for our ACK of
    the one before, and Linux delays that ACK by up to 40 ms. Bulk reads are left alone.
    """

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.sock: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sock = transport.get_extra_info("socket")
        batched = BatchedWrites(transport, asyncio.get_running_loop())
        self.inner.connection_made(batched)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if len(data) < QUICKACK_BELOW:
            quickack(self.sock)
        self.inner.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.inner.eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _LoginDialer:
    """asyncssh's ``tunnel`` hook, used only to put :class:`_LoginLink` under the connection."""

    async def create_connection(
        self, session_factory: Callable[[], Any], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, Any]:
        loop = asyncio.get_running_loop()
        inner = session_factory()
        transport, _ = await loop.create_connection(lambda: _LoginLink(inner), host, port)
        return transport, inner


class SshUnavailable(RelayError, ConnectionError):
    """No login node could be reached; the message says why for each one. A stream waiting
    for it is refused with a general failure.

    ``retry_after`` is the earliest moment (seconds from now) an attempt may succeed when
    the connection rate limit, not a failure, was what stopped it.
    """

    code = s5.GENERAL_FAILURE
    reason = "ssh-unavailable"

    def __init__(self, message: str, retry_after: float = 0.0, final: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.final = final
        """Every login node refused us for a reason waiting does not fix (our key, its host
        key, no ssh program): a caller with a deadline may give up at once."""


class ConnectBudget:
    """Token bucket: at most ``per_minute`` new SSH connections to one login node.

    JSC blocks hosts that log in too often, so this holds even when every stream of a
    worker wants its carrier back at the same moment, and the hop's slots share one bucket
    per login node: N connections cost N tokens, never N budgets.
    """

    def __init__(self, per_minute: float, now: float) -> None:
        self.capacity = max(1.0, per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """Use a token and return 0, or return how long until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else float("inf")


def slot_for(place: int, connections: int) -> int:
    """The slot an exit's carrier at ``place`` (0 to --carriers - 1) rides: round robin, so
    that with as many SSH connections as carriers each carrier has a connection (an sshd and
    an ssh) of its own."""
    return place % max(1, connections)


class Slot:
    """One SSH connection of the hop, with its own failover state: the login node it uses,
    where it starts looking after a loss, and its hold after every node failed. A slot that
    dies logs in again when a carrier asks for it; the other slots go on untouched."""

    lock = LoopBound(asyncio.Lock)
    """One connection attempt at a time in this slot (made in the running loop: see
    relay.loopbound): every carrier that needs it waits for that attempt."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: Optional[Connection] = None
        self.current: Optional[Login] = None
        self.preferred = 0
        self.last_failure = -1e9
        """When every login node last failed: for ``retry_after`` after it the last error is
        raised again instead of a new attempt (the connection budgets limit the rate besides)."""
        self.last_error: Optional[SshUnavailable] = None
        self.watcher: Optional[asyncio.Future[None]] = None


class SshHop:
    """The worker's way through the login nodes: ``connections`` slots, each an SSH
    connection of its own that fails over and reconnects alone, and one login budget per
    login node that all slots draw on."""

    def __init__(
        self,
        logins: Sequence[Login],
        client_key: Optional[Path],
        known_hosts: Optional[Path],
        metrics: Metrics,
        *,
        keepalive: float = 15.0,
        connect_timeout: float = 15.0,
        connects_per_minute: float = 4.0,
        retry_after: float = 1.0,
        client: str = "asyncssh",
        targets: Sequence[tuple[str, int]] = (),
        tcp_targets: Sequence[tuple[str, int]] = (),
        ssh_config: Optional[Path] = None,
        connections: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``client`` is "asyncssh" (in-process) or "openssh" (the ``ssh`` program, see
        relay.openssh), which forwards only ``targets`` (Unix sockets, for carriers) and
        ``tcp_targets`` (loopback ports). ``connections`` is the number of slots; ``clock``
        (seconds, monotonic) paces the budgets and holds."""
        if not logins:
            raise ValueError("at least one login node")
        self.logins = list(logins)
        self.client_key = client_key
        self.known_hosts = known_hosts
        self.metrics = metrics
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self.client = client
        self.targets = list(targets)
        self.tcp_targets = list(tcp_targets)
        self.ssh_config = ssh_config
        self._clock = clock
        now = clock()
        self._budgets = [ConnectBudget(connects_per_minute, now) for _ in self.logins]
        """One per login node, shared by every slot: the cap holds for the worker."""
        self.slots = [Slot(index) for index in range(max(1, connections))]
        self._closed = False

    @property
    def connections(self) -> int:
        """How many slots (SSH connections at most) the hop keeps."""
        return len(self.slots)

    @property
    def connected(self) -> bool:
        """At least one slot has its connection up."""
        return any(slot.conn is not None for slot in self.slots)

    @property
    def current(self) -> Optional[Login]:
        """The login node of the first slot that is up (None while none is)."""
        return next((slot.current for slot in self.slots if slot.conn is not None), None)

    def slot_connected(self, slot: int) -> bool:
        return self.slots[slot % len(self.slots)].conn is not None

    async def connection(self, slot: int = 0) -> Connection:
        """The live connection of ``slot``, opening one if there is none.

        Login nodes are tried in failover order starting with the one that worked last for
        this slot; each within its connection budget. One attempt runs at a time per slot:
        every carrier that needs the connection waits for that attempt instead of starting
        its own.
        """
        state = self.slots[slot % len(self.slots)]
        if state.conn is not None:
            return state.conn
        async with state.lock:
            if state.conn is not None:
                return state.conn
            if self._closed:
                raise SshUnavailable("worker is stopping")
            if state.last_error is not None and (
                self._clock() - state.last_failure < self.retry_after
            ):
                raise state.last_error
            return await self._login(state)

    async def _login(self, state: Slot) -> Connection:
        errors, waits = [], []
        final = 0
        count = len(self.logins)
        for step in range(count):
            index = (state.preferred + step) % count
            login = self.logins[index]
            fields = {"login": str(login), "slot": state.index}
            wait = self._budgets[index].take(self._clock())
            if wait > 0:
                self.metrics.ssh_connects.labels(str(login), "rate-limited").inc()
                errors.append(f"{login}: connection rate limit, next try in {wait:.0f}s")
                waits.append(wait)
                continue
            try:
                conn = await self._connect(login, state.index)
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                why = explain(exc)
                final += is_final(exc)
                self.metrics.ssh_connects.labels(str(login), "failed").inc()
                log.warning("SSH to login node failed", extra={"fields": {**fields, "why": why}})
                errors.append(f"{login}: {why}")
                continue
            self.metrics.ssh_connects.labels(str(login), "ok").inc()
            self.metrics.ssh_active.inc()
            state.conn = conn
            state.current = login
            state.preferred = index
            state.last_error = None
            state.watcher = asyncio.ensure_future(self._watch(state, conn, login))
            log.info("SSH connected", extra={"fields": fields})
            return conn
        state.preferred = (state.preferred + 1) % count
        state.last_failure = self._clock()
        state.last_error = SshUnavailable(
            "; ".join(errors), min(waits) if len(waits) == count else 0.0, final == count
        )
        raise state.last_error

    async def connect_to(self, login: Login) -> Connection:
        """A connection to ``login`` alone, with the worker's options; errors raised unchanged.

        For ``relay check``, which tries every login node and explains the exact error. The
        connection is the caller's to close; :meth:`connection` never hands it out, and it
        takes no token of the budget.
        """
        return await self._connect(login)

    async def _connect(self, login: Login, slot: int = 0) -> Connection:
        conn: Connection
        if self.client == "openssh":
            conn = await OpenSshConnection.start(
                login.host,
                login.port,
                login.user,
                self.targets,
                tcp_targets=self.tcp_targets,
                client_key=self.client_key,
                known_hosts=self.known_hosts,
                keepalive=self.keepalive,
                connect_timeout=self.connect_timeout,
                config=self.ssh_config,
                slot=slot,
            )
        else:
            conn = await self._connect_asyncssh(login)
        conn.set_extra_info(login=login, slot=slot)
        return conn

    async def _connect_asyncssh(self, login: Login) -> asyncssh.SSHClientConnection:
        options: dict[str, Any] = {
            "username": login.user or getpass.getuser(),
            "port": login.port,
            "client_keys": [str(self.client_key)] if self.client_key else None,
            "agent_path": None,
            "config": None,
            "keepalive_interval": self.keepalive,
            "keepalive_count_max": 3,
            "tcp_keepalive": True,
            "encryption_algs": list(CIPHERS),
            "connect_timeout": self.connect_timeout,
            "tunnel": _LoginDialer(),
        }
        if self.known_hosts is not None:
            options["known_hosts"] = str(self.known_hosts)
        return await asyncssh.connect(login.host, **options)

    async def _watch(self, state: Slot, conn: Connection, login: Login) -> None:
        await conn.wait_closed()
        if state.conn is conn:
            state.conn = None
            state.current = None
            self.metrics.ssh_active.dec()
            if not self._closed:
                self.metrics.reconnects.inc()
                log.warning(
                    "SSH connection lost",
                    extra={"fields": {"login": str(login), "slot": state.index}},
                )

    async def close(self) -> None:
        self._closed = True
        conns = []
        for state in self.slots:
            conn, state.conn = state.conn, None
            if conn is not None:
                self.metrics.ssh_active.dec()
                conn.close()
                conns.append(conn)
        for conn in conns:
            await conn.wait_closed()


#: ssh's failure kinds (relay.net.openssh.classify) that no retry within minutes fixes.
FINAL_KINDS = frozenset(("host-key", "key", "auth", "missing"))


def is_final(exc: BaseException) -> bool:
    """A login failure that only a change of configuration fixes."""
    if isinstance(exc, OpenSshError):
        return exc.kind in FINAL_KINDS
    return isinstance(exc, (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied))


def explain(exc: BaseException) -> str:
    """One line for the log and the client's error: what failed, and the flag to check."""
    if isinstance(exc, OpenSshError):
        return _OPENSSH_HINTS.get(exc.kind, "{}").format(str(exc))
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verifiable ({exc.reason}): check --known-hosts"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "permission denied: the login node did not accept --ssh-key"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    return str(exc) or type(exc).__name__

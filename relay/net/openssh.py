"""The SSH hop run by the site's own OpenSSH client (``--ssh-client openssh``).

One ``ssh -N`` process per login connection (per slot of the hop) forwards a private Unix
socket to each exit (``-L PATH:EXIT``), in a directory of its own. A carrier is a connection
to that socket: ssh opens a direct-tcpip channel for it, so the SSH crypto runs in C, and the
user's ``~/.ssh/config`` (ProxyJump, certificates, GSSAPI, per-host options) applies as it
does to any ``ssh`` they type. The process is one login, like one asyncssh connection, and
counts against the same login budget.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from relay.net.addresses import format_hostport
from relay.net.childsocket import borrow_tcp_socket
from relay.net.sockopts import quickack
from relay.proto.errors import RelayError

log = logging.getLogger("relay.ssh")

PROGRAM = "ssh"
"""The OpenSSH client, found on PATH as a login shell would."""

CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
"""OpenSSH's default set with AES-GCM first: two to three times cheaper per byte than
chacha20-poly1305 on CPUs with AES instructions (every HPC node)."""

_POLL = 0.02
_TERM_GRACE = 5.0
_TERM_AGAIN = 0.2
_STDERR_LINES = 40


class OpenSshError(RelayError, ConnectionError):
    """ssh exited before its forwards were up; ``kind`` (also ``reason``) names the cause,
    the message is ssh's."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, reason=kind)
        self.kind = kind


_CAUSES = (
    ("host-key", re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS "
                            r"CHANGED|No \S+ host key is known|host key .* not verifiable")),
    # An unreadable key ends in "Permission denied" too: the key is the cause.
    ("key", re.compile(r"Load key|Identity file .* not accessible|invalid format")),
    ("auth", re.compile(r"Permission denied")),
    ("refused", re.compile(r"Connection refused")),
    ("timeout", re.compile(r"timed out|Operation timed out")),
    ("resolve", re.compile(r"Could not resolve hostname|Name or service not known")),
    ("forward", re.compile(r"Could not request local forwarding|bind \[?.*\]?: |cannot listen")),
    ("closed", re.compile(r"Connection closed by|Connection reset|kex_exchange_identification")),
)  # fmt: skip


def classify(lines: Sequence[str]) -> tuple[str, str]:
    """(kind, message) for what ssh wrote before exiting: the first line naming a known
    cause wins; otherwise the last line."""
    for kind, pattern in _CAUSES:
        for line in lines:
            if pattern.search(line):
                return kind, line.strip()
    tail = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return "other", tail or "ssh exited without saying why"


def command(
    host: str,
    port: int,
    user: Optional[str],
    forwards: Sequence[str],
    *,
    client_key: Optional[Path],
    known_hosts: Optional[Path],
    keepalive: float,
    connect_timeout: float,
    config: Optional[Path] = None,
    program: str = PROGRAM,
) -> list[str]:
    """The ssh command line: no shell, no prompts, dead after ``3 * keepalive`` of silence."""
    argv = [program] + (["-F", str(config)] if config is not None else [])
    argv += [
        "-N",
        "-T",
        "-x",
        "-a",
        "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "StreamLocalBindUnlink=yes",
        "-o", "StreamLocalBindMask=0177",
        "-o", f"ServerAliveInterval={max(1, math.ceil(keepalive))}",
        "-o", "ServerAliveCountMax=3",
        "-o", "TCPKeepAlive=yes",
        "-o", f"ConnectTimeout={max(1, math.ceil(connect_timeout))}",
        # A shared master would outlive this process and hide its death from the carriers.
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "Ciphers=" + ",".join(CIPHERS),
        "-p", str(port),
    ]  # fmt: skip
    if client_key is not None:
        argv += ["-i", str(client_key), "-o", "IdentitiesOnly=yes"]
    if known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    if user:
        argv += ["-l", user]
    for spec in forwards:
        argv += ["-L", spec]
    argv.append(host)
    return argv


def _die_with_parent() -> None:
    """In the child: SIGTERM when the worker dies, so a killed worker leaves no login behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OpenSshConnection:
    """A running ``ssh -N`` and its forwards; carriers connect to :meth:`create_connection`."""

    _line: asyncio.Event
    _reader: asyncio.Future[None]
    _ended: asyncio.Future[None]

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        workdir: Path,
        sockets: dict[tuple[str, int], str],
        ports: dict[tuple[str, int], int],
        slot: int = 0,
    ) -> None:
        self.proc = proc
        self.slot = slot
        self.workdir = workdir
        self.sockets = sockets
        self.ports = ports
        self.stderr: collections.deque[tuple[float, str]] = collections.deque(maxlen=_STDERR_LINES)
        self._extra: dict[str, Any] = {}
        self._killer: Optional[asyncio.TimerHandle] = None
        self._term_deadline = 0.0
        self.login_socket: Optional[socket.socket] = None
        """A duplicate of ssh's connection to the login node, for socket options only
        (relay.net.childsocket); None where the system or ssh's configuration gives none."""

    def _watch(self) -> None:
        """Read ssh's stderr and wait for its end (in the running loop, from start())."""
        self._line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read_stderr())
        self._ended = asyncio.ensure_future(self._reap())

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        user: Optional[str],
        targets: Sequence[tuple[str, int]],
        *,
        tcp_targets: Sequence[tuple[str, int]] = (),
        client_key: Optional[Path] = None,
        known_hosts: Optional[Path] = None,
        keepalive: float = 15.0,
        connect_timeout: float = 15.0,
        config: Optional[Path] = None,
        program: str = PROGRAM,
        slot: int = 0,
    ) -> OpenSshConnection:
        """Start ssh and return once every forward listens; :class:`OpenSshError` if ssh
        exits first (its cause from stderr), :class:`asyncio.TimeoutError` if it hangs.

        ``targets`` get a Unix socket each (carriers); ``tcp_targets`` a loopback port (for
        clients that need a TCP address, like the SOCKS5 upstream). Each process has a
        fresh private directory for its sockets, so the hop's slots never share a path;
        ``slot`` names the process's slot in that directory's name and in its log lines.
        """
        workdir = Path(tempfile.mkdtemp(prefix=f"relay-ssh{slot}-", dir=_socket_dir()))
        sockets = {t: str(workdir / str(i)) for i, t in enumerate(dict.fromkeys(targets))}
        ports = {t: _free_loopback_port() for t in dict.fromkeys(tcp_targets)}
        specs = [f"{path}:{format_hostport(*t)}" for t, path in sockets.items()]
        specs += [f"127.0.0.1:{p}:{format_hostport(*t)}" for t, p in ports.items()]
        argv = command(
            host,
            port,
            user,
            specs,
            client_key=client_key,
            known_hosts=known_hosts,
            keepalive=keepalive,
            connect_timeout=connect_timeout,
            config=config,
            program=program,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise OpenSshError("missing", f"cannot run {program}: {exc.strerror or exc}") from exc
        conn = cls(proc, workdir, sockets, ports, slot)
        conn._watch()
        try:
            await asyncio.wait_for(conn._forwards_up(), connect_timeout + 1)
        except BaseException:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.wait_closed())
            raise
        conn.login_socket = borrow_tcp_socket(proc.pid)
        if conn.login_socket is None:
            log.debug(
                "no duplicate of ssh's connection: small packets are acknowledged by ACK frames",
                extra={"fields": {"pid": proc.pid, "slot": slot}},
            )
        return conn

    async def _forwards_up(self) -> None:
        """Wait for every forward to listen (ssh binds them after logging in)."""
        pending = set(self.sockets.values())
        ports = set(self.ports.values())
        while True:
            if self.proc.returncode is not None:
                await self._reader
                kind, why = classify([line for _, line in self.stderr])
                raise OpenSshError(kind, why)
            pending = {p for p in pending if not _is_socket(p)}
            ports = {p for p in ports if not _listens(p)}
            if not pending and not ports:
                return
            await asyncio.sleep(_POLL)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr.append((time.monotonic(), line))
                self._line.set()
                fields = {"pid": self.proc.pid, "slot": self.slot}
                log.info("ssh: %s", line, extra={"fields": fields})

    async def _reap(self) -> None:
        try:
            await self.proc.wait()
            self._release_socket()  # else the connection would outlive ssh
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 2)
        finally:
            self._release_socket()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _release_socket(self) -> None:
        sock, self.login_socket = self.login_socket, None
        if sock is not None:
            sock.close()

    # -- what SshHop and the worker use ---------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def create_connection(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        """A byte pipe to ``host:port`` through the login node (a direct-tcpip channel)."""
        path = self.sockets.get((host, port))
        if path is None:
            raise ConnectionError(f"no ssh forward to {format_hostport(host, port)}")
        if not self.alive:
            raise ConnectionError(f"ssh exited ({self.exit_reason()})")
        loop = asyncio.get_running_loop()
        return await loop.create_unix_connection(factory, path)

    def acknowledge(self) -> None:
        """Have ssh's connection acknowledge what it received at once (after a small read
        of a carrier: sshd holds its next small packet until then)."""
        quickack(self.login_socket)

    def local_port(self, host: str, port: int) -> int:
        """The loopback port forwarded to ``host:port`` (a ``tcp_targets`` entry)."""
        return self.ports[(host, port)]

    async def channel_failure(self, since: float, wait: float = 0.2) -> Optional[str]:
        """Why ssh closed a carrier at once: its "open failed" line after ``since``.

        ssh writes that line before it closes the socket, but the two arrive on different
        pipes, so wait briefly for it.
        """
        deadline = time.monotonic() + wait
        while True:
            for stamp, line in reversed(self.stderr):
                if stamp < since:
                    break
                if "open failed" in line:
                    return line.split("open failed:", 1)[-1].strip()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.alive:
                return None
            self._line.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._line.wait(), remaining)

    def exit_reason(self) -> str:
        return classify([line for _, line in self.stderr])[1]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_extra_info(self, **kwargs: Any) -> None:
        self._extra.update(kwargs)

    def close(self) -> None:
        """SIGTERM now and again every :data:`_TERM_AGAIN` (ssh can miss one that arrives
        just before it sleeps in poll()); SIGKILL after :data:`_TERM_GRACE`."""
        self._release_socket()
        if self.proc.returncode is None and self._killer is None:
            self._term_deadline = time.monotonic() + _TERM_GRACE
            self._terminate()

    def _terminate(self) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if time.monotonic() < self._term_deadline:
                self.proc.terminate()
            else:
                self.proc.kill()
                return
        self._killer = asyncio.get_running_loop().call_later(_TERM_AGAIN, self._terminate)

    async def wait_closed(self) -> None:
        """Until the ssh process has ended (by itself, or after :meth:`close`)."""
        await asyncio.shield(self._ended)
        if self._killer is not None:
            self._killer.cancel()


def _socket_dir() -> Optional[str]:
    """$XDG_RUNTIME_DIR when usable (private, in memory), else the temp dir; Unix socket
    paths must stay under about 100 bytes."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK) and len(runtime) < 60:
        return runtime
    return None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _listens(port: int) -> bool:
    """True once something listens on 127.0.0.1:port (ssh's TCP forward), read from
    /proc/net/tcp: a test connection would open a channel to the target."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as table:
            return any(
                f[1] == want and f[3] == "0A" for f in (row.split() for row in table) if len(f) > 3
            )
    except OSError:
        return True  # no /proc: the first client finds out

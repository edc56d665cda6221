"""``relay-exit --workers N``: the process systemd starts runs N relay-exit processes that
accept on one port (SO_REUSEPORT), tells systemd READY=1 once all of them listen, passes
SIGHUP and SIGTERM/SIGINT on, restarts a process that dies (at most RESTART_BURST times
in RESTART_WINDOW seconds, else it stops them all and fails) and serves one /metrics for
the group: every process's series with a ``worker`` label.

What the processes share is set up here and inherited: one SOCK_SEQPACKET socketpair per
process over which the others hand it connections (:mod:`relay.exit.group`), a control
socketpair per process (it says "ready"; its closing tells either side the other is gone),
and a private 0700 directory for the processes' metrics sockets. The supervisor keeps its
copies of all of them, so a restarted process takes over its predecessor's inbox, and keeps
the port bound (without listening) across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.exit.group import GROUP_ENV, READY, GroupPlace
from relay.metrics import serve_metrics
from relay.net.loopbound import LoopBound
from relay.systemd import notify

log = logging.getLogger("relay.supervisor")

RESTART_BURST = 5
RESTART_WINDOW = 60.0
RESTART_DELAY = 0.5
START_TIMEOUT = 30.0
STOP_GRACE = 20.0
"""Seconds after SIGTERM before a process still running is killed (it drains for 10)."""
SCRAPE_TIMEOUT = 5.0
HANDOFF_BUFFER = 4 << 20


class _Child:
    ready = LoopBound(asyncio.Event)

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.control: Optional[socket.socket] = None  # the supervisor's end
        self.restarts: list[float] = []


class _Merged:
    """A collector made of already-parsed families (prometheus_client's interface)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_expositions(texts: dict[int, str]) -> list[Metric]:
    """The families of all processes, each sample labelled with its process's index."""
    merged: dict[str, Metric] = {}
    for index in sorted(texts):
        for family in text_string_to_metric_families(texts[index]):
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            for sample in family.samples:
                labels = dict(sample.labels, worker=str(index))
                into.add_sample(sample.name, labels, sample.value, sample.timestamp)
    return list(merged.values())


class Supervisor:
    _wake = LoopBound(asyncio.Event)

    def __init__(
        self,
        args: Sequence[str],
        processes: int,
        host: str,
        port: int,
        metrics: Optional[tuple[str, int]],
    ) -> None:
        self.args = list(args)
        self.processes = processes
        self.host = host
        self.port = port
        self.metrics_address = metrics
        self.children = [_Child(i) for i in range(processes)]
        self.inboxes: list[tuple[socket.socket, socket.socket]] = []
        self.rundir = ""
        self.stopping = False
        self.failed = False
        self._reserved: Optional[socket.socket] = None
        self.registry = CollectorRegistry()
        self.restarts_total = Counter(
            "relay_exit_worker_restarts",
            "relay-exit --workers processes restarted after they died",
            ["worker"],
            registry=self.registry,
        )
        self.up = Gauge(
            "relay_exit_worker_up",
            "1 while a relay-exit --workers process answers its supervisor's scrape",
            ["worker"],
            registry=self.registry,
        )

    # -- set-up ---------------------------------------------------------------------------
    def _reserve_port(self) -> None:
        """Bind (not listen) the port with SO_REUSEPORT: a port taken by another program is
        a clear error before any process starts, and the port stays held (only processes of
        the same user can join it) while a process restarts. The processes bind it too and
        listen; the kernel only hands connections to listening sockets."""
        infos = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._reserved = sock
        self.port = int(sock.getsockname()[1])

    def _channels(self) -> None:
        for _ in range(self.processes):
            inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for sock in (inbox, outbox):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HANDOFF_BUFFER)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HANDOFF_BUFFER)
            self.inboxes.append((inbox, outbox))
        base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.rundir = tempfile.mkdtemp(prefix="relay-exit-", dir=base)  # mode 0700

    def metrics_path(self, index: int) -> str:
        return os.path.join(self.rundir, f"metrics-{index}.sock")

    async def _spawn(self, child: _Child) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        peers = [
            -1 if i == child.index else out.fileno() for i, (_, out) in enumerate(self.inboxes)
        ]
        place = GroupPlace(
            index=child.index,
            processes=self.processes,
            port=self.port,
            inbox=self.inboxes[child.index][0].fileno(),
            peers=peers,
            control=theirs.fileno(),
            metrics_path=self.metrics_path(child.index) if self.metrics_address else "",
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(place.metrics_path)
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # readiness goes through the supervisor
        env[GROUP_ENV] = place.to_env()
        fds = [place.inbox, place.control, *[fd for fd in peers if fd >= 0]]
        child.ready.clear()
        try:
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.cli", "exit", *self.args, env=env, pass_fds=fds
            )
        finally:
            theirs.close()
        child.control = ours
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._control_readable, child)
        log.info(
            "worker started",
            extra={"fields": {"worker": child.index, "pid": child.proc.pid}},
        )

    def _control_readable(self, child: _Child) -> None:
        control = child.control
        if control is None:
            return
        try:
            data = control.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if READY in data:
            child.ready.set()
            self._wake.set()
        if not data:
            asyncio.get_running_loop().remove_reader(control.fileno())

    def _close_control(self, child: _Child) -> None:
        if child.control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(child.control.fileno())
            child.control.close()
            child.control = None

    # -- running --------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self._reserve_port()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        self._channels()
        metrics_server = None
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            for child in self.children:
                await self._spawn(child)
            if not await self._all_ready():
                self.failed = not self.stopping
                return await self._shutdown()
            if self.metrics_address is not None:
                host, port = self.metrics_address
                metrics_server = await serve_metrics(self.exposition, host, port)
                bound = metrics_server.sockets[0].getsockname()
                log.info("metrics", extra={"fields": {"addr": f"{bound[0]}:{bound[1]}"}})
            log.info(
                "listening",
                extra={"fields": {"port": self.port, "workers": self.processes}},
            )
            notify(f"READY=1\nSTATUS=serving with {self.processes} workers")
            await self._watch()
            return await self._shutdown()
        finally:
            if metrics_server is not None:
                metrics_server.close()
            for child in self.children:
                self._close_control(child)
            for inbox, outbox in self.inboxes:
                inbox.close()
                outbox.close()
            if self._reserved is not None:
                self._reserved.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    async def _all_ready(self) -> bool:
        """Wait until every process listens; False if one exits first or it takes too long."""
        deadline = time.monotonic() + START_TIMEOUT
        while not all(c.ready.is_set() for c in self.children):
            for child in self.children:
                if child.proc is not None and child.proc.returncode is not None:
                    log.error(
                        "worker failed to start",
                        extra={"fields": {"worker": child.index, "code": child.proc.returncode}},
                    )
                    return False
            if self.stopping or time.monotonic() > deadline:
                if not self.stopping:
                    log.error("workers did not start in time")
                return False
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
        return True

    async def _watch(self) -> None:
        """Until told to stop: restart a process that died, within the rate limit."""
        waits = {c.index: asyncio.ensure_future(self._wait(c)) for c in self.children}
        stop = asyncio.ensure_future(self._stopped())
        try:
            while not self.stopping:
                done, _ = await asyncio.wait(
                    [stop, *waits.values()], return_when=asyncio.FIRST_COMPLETED
                )
                for index, task in list(waits.items()):
                    if task not in done or self.stopping:
                        continue
                    child = self.children[index]
                    code = task.result()
                    self._close_control(child)
                    log.warning(
                        "worker died",
                        extra={"fields": {"worker": index, "code": code}},
                    )
                    now = time.monotonic()
                    child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW]
                    if len(child.restarts) >= RESTART_BURST:
                        log.error(
                            "worker keeps dying; stopping",
                            extra={"fields": {"worker": index, "restarts": len(child.restarts)}},
                        )
                        self.failed = True
                        self.stopping = True
                        break
                    child.restarts.append(now)
                    await asyncio.sleep(RESTART_DELAY)
                    if self.stopping:
                        break
                    self.restarts_total.labels(str(index)).inc()
                    await self._spawn(child)
                    waits[index] = asyncio.ensure_future(self._wait(child))
        finally:
            stop.cancel()
            for task in waits.values():
                task.cancel()

    async def _wait(self, child: _Child) -> int:
        assert child.proc is not None
        return await child.proc.wait()

    async def _stopped(self) -> None:
        while not self.stopping:
            self._wake.clear()
            await self._wake.wait()

    def _stop(self) -> None:
        if not self.stopping:
            log.info("stopping: draining the workers")
        self.stopping = True
        self._wake.set()

    def _reload(self) -> None:
        notify("RELOADING=1")
        running = [c for c in self.children if c.proc is not None and c.proc.returncode is None]
        log.info("reload: passing SIGHUP on", extra={"fields": {"workers": len(running)}})
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGHUP)
        notify("READY=1")

    async def _shutdown(self) -> int:
        """SIGTERM to every process, wait for them to drain, kill what is left."""
        notify("STOPPING=1")
        procs = [c.proc for c in self.children if c.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(await asyncio.wait_for(proc.wait(), STOP_GRACE))
            except asyncio.TimeoutError:
                log.warning("worker did not stop; killing it", extra={"fields": {"pid": proc.pid}})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                codes.append(await proc.wait())
        clean = all(code == 0 for code in codes)
        log.info("stopped", extra={"fields": {"codes": ",".join(map(str, codes))}})
        return 1 if self.failed or not clean else 0

    # -- metrics --------------------------------------------------------------------------
    async def exposition(self) -> bytes:
        texts: dict[int, str] = {}
        results = await asyncio.gather(
            *(self._scrape(c.index) for c in self.children), return_exceptions=True
        )
        for child, result in zip(self.children, results):
            ok = isinstance(result, str)
            self.up.labels(str(child.index)).set(1 if ok else 0)
            if isinstance(result, str):
                texts[child.index] = result
        registry = CollectorRegistry()
        registry.register(_Merged(merge_expositions(texts)))
        return generate_latest(registry) + generate_latest(self.registry)

    async def _scrape(self, index: int) -> str:
        async def fetch() -> str:
            reader, writer = await asyncio.open_unix_connection(self.metrics_path(index))
            try:
                writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
                response = await reader.read()
            finally:
                writer.close()
            head, _, body = response.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.0 200"):
                raise OSError(f"worker {index} metrics: {head[:40]!r}")
            return body.decode()

        return await asyncio.wait_for(fetch(), SCRAPE_TIMEOUT)


def supervise(args: Sequence[str], cfg: Any) -> int:
    """Run the group (called by relay-exit when ``workers`` is above 1)."""
    log.info("relay-exit %s supervising %d workers", __version__, cfg.workers)
    metrics = (cfg.metrics.host, cfg.metrics.port) if cfg.metrics else None

    async def run() -> int:
        # Built inside the running loop, which is what its asyncio objects bind to.
        return await Supervisor(args, cfg.workers, cfg.listen.host, cfg.listen.port, metrics).run()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0

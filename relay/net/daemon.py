"""What relay-exit and relay-worker share: a listener, a metrics endpoint, the open streams,
and the order in which they stop (stop accepting, drain, reset what is left)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from typing import Any, Callable, Optional, Union

from relay.metrics import Metrics, serve_metrics, serve_metrics_unix
from relay.net.compat import fix_writelines_flow_control
from relay.net.muxpump import MuxPump
from relay.net.pump import RawPump

log = logging.getLogger("relay")

fix_writelines_flow_control()  # before any daemon writes: the pumps rely on back-pressure

Pump = Union[MuxPump, RawPump]


class Daemon(abc.ABC):
    role = "daemon"

    def __init__(self, metrics: Optional[Metrics]) -> None:
        self.metrics = metrics or Metrics(self.role)
        self.pumps: set[Pump] = set()
        self.connections: set[Any] = set()
        self._server: Optional[asyncio.Server] = None
        self._metrics_server: Optional[asyncio.Server] = None

    async def _listen(
        self,
        factory: Callable[[], asyncio.Protocol],
        host: str,
        port: int,
        metrics_host: Optional[str],
        metrics_port: int,
        reuse_port: bool = False,
        metrics_path: str = "",
    ) -> None:
        """Listen on ``host:port`` (sharing it with other processes when ``reuse_port``);
        metrics on ``metrics_host:metrics_port`` or, for a --workers process, the Unix
        socket ``metrics_path`` its supervisor reads."""
        loop = asyncio.get_running_loop()
        if reuse_port:
            self._server = await loop.create_server(
                factory, host, port, backlog=1024, reuse_port=True
            )
        else:
            self._server = await loop.create_server(factory, host, port, backlog=1024)
        if metrics_path:
            self._metrics_server = await serve_metrics_unix(self.metrics, metrics_path)
        elif metrics_host is not None:
            self._metrics_server = await serve_metrics(self.metrics, metrics_host, metrics_port)

    @abc.abstractmethod
    async def start(self) -> None:
        """Listen (and serve metrics when configured)."""

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    @property
    def metrics_address(self) -> Optional[tuple[str, int]]:
        if self._metrics_server is None:
            return None
        return self._metrics_server.sockets[0].getsockname()[:2]

    def stream_done(self, pump: Pump, result: str) -> None:
        self.pumps.discard(pump)

    async def drain(self, timeout: float) -> None:
        """Stop accepting and give open streams up to ``timeout`` seconds to end by themselves."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pumps and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop listening and reset every stream still open."""
        for server in (self._server, self._metrics_server):
            if server is not None:
                server.close()
        for pump in list(self.pumps):
            if isinstance(pump, MuxPump):
                pump.shutdown(f"{self.role} stopping")
            else:
                pump.lost(0, ConnectionAbortedError(f"{self.role} stopping"))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for server in (self._server, self._metrics_server):
            if server is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 2)

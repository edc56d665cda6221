"""Prometheus metrics of both daemons and the small HTTP endpoint that serves them.

Each daemon gets its own registry, so several daemons can share one process (tests, the
demo) without their numbers mixing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Callable, Union

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay import __version__

log = logging.getLogger("relay.metrics")

# The *_created series only double the scrape size for dashboards that never use them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every ``relay_`` metric; a daemon moves the ones that apply to it."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        info = Gauge("relay_info", "Build and role of this daemon", ["version", "role"], registry=r)
        info.labels(__version__, role).set(1)
        self.streams_active = Gauge("relay_streams_active", "Streams open now", registry=r)
        self.streams = Counter("relay_streams", "Streams ended, by result", ["result"], registry=r)
        self.bytes = Counter(
            "relay_bytes",
            "Application bytes relayed; up = towards the destination, down = towards the client",
            ["direction"],
            registry=r,
        )
        self.carriers_active = Gauge(
            "relay_carriers_active",
            "Tunnel carriers (worker-exit connections) open now",
            registry=r,
        )
        self.carriers = Counter(
            "relay_carriers", "Tunnel carriers opened, by result", ["result"], registry=r
        )
        self.reconnects = Counter(
            "relay_reconnects", "Reconnects after a carrier or SSH connection died", registry=r
        )
        self.resumes = Counter("relay_resumes", "Stream resumes, by result", ["result"], registry=r)
        self.parked = Gauge(
            "relay_parked_sessions", "Sessions waiting for their worker to resume", registry=r
        )
        self.replay_bytes = Gauge(
            "relay_replay_buffer_bytes", "Unacknowledged bytes held for resume", registry=r
        )
        self.heartbeat_rtt = Histogram(
            "relay_heartbeat_rtt_seconds",
            "Round trip of tunnel PING/PONG",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handshake = Histogram(
            "relay_handshake_seconds",
            "Time to set up a stream: worker, from the local client's request to the exit's"
            " answer; exit, from the OPEN to its answer (destination resolved and dialled)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.carrier_handshake = Histogram(
            "relay_carrier_handshake_seconds",
            "Time from a carrier's first byte to its HELLO reply (new session, further carrier"
            " or resume)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "relay_auth_failures", "Authentication failures, by reason", ["reason"], registry=r
        )
        self.policy_denials = Counter(
            "relay_policy_denials",
            "Destinations refused by policy, by reason",
            ["reason"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "relay_protocol_errors",
            "Connections closed for malformed or truncated input, by stage",
            ["stage"],
            registry=r,
        )
        self.limit_hits = Counter(
            "relay_limit_hits",
            "Requests refused because a limit was reached",
            ["limit"],
            registry=r,
        )
        self.handoffs = Counter(
            "relay_handoffs",
            "Connections passed between the processes of relay-exit --workers, by kind"
            " (new, resume) and result (sent, adopted, failed)",
            ["kind", "result"],
            registry=r,
        )
        self.frames = Counter(
            "relay_frames",
            "Tunnel frames sent and received on all carriers, by direction (in, out)",
            ["direction"],
            registry=r,
        )
        self.credit_stalls = Counter(
            "relay_credit_stalls",
            "Times a stream stopped reading its application side because the peer had not"
            " acknowledged a window of its bytes yet (a slow reader stalls its own stream only)",
            registry=r,
        )
        self.streams_per_carrier = Histogram(
            "relay_streams_per_carrier",
            "Streams on a carrier, sampled each heartbeat",
            buckets=(0, 1, 10, 100, 1000, 10000),
            registry=r,
        )
        self.ssh_active = Gauge(
            "relay_ssh_connections_active", "SSH connections to login nodes open now", registry=r
        )
        self.ssh_connects = Counter(
            "relay_ssh_connects",
            "SSH connection attempts, by login node and result",
            ["login", "result"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


Exposition = Callable[[], Awaitable[bytes]]


def _handler(exposition: Exposition) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if parts[0] != b"GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == b"/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await exposition()
            elif path == b"/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except OSError as exc:
            log.debug("metrics client: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return handle


def _of(metrics: Metrics) -> Exposition:
    async def exposition() -> bytes:
        return metrics.exposition()

    return exposition


async def serve_metrics(
    metrics: Union[Metrics, Exposition], host: str, port: int
) -> asyncio.Server:
    """Serve ``GET /metrics`` (and ``/healthz``) with plain asyncio: no thread, port 0 works.
    ``metrics`` is a daemon's metrics or a coroutine function that makes the exposition."""
    exposition = _of(metrics) if isinstance(metrics, Metrics) else metrics
    return await asyncio.start_server(_handler(exposition), host, port)


async def serve_metrics_unix(metrics: Metrics, path: str) -> asyncio.Server:
    """The same endpoint on a Unix socket: how a --workers process shows its supervisor."""
    return await asyncio.start_unix_server(_handler(_of(metrics)), path)

"""What relay-exit reads, as one object that tests and the demo can build directly."""

from __future__ import annotations

import logging
import ssl
from typing import Any, Optional

from relay.exit.policy import Policy
from relay.net.tlslink import cert_fingerprint, server_context
from relay.secrets import load_keys

log = logging.getLogger("relay.exit")


class ExitSettings:
    """The knobs the exit reads, so tests and the demo need not build a whole config."""

    def __init__(self, **kwargs: Any) -> None:
        self.listen_host: str = kwargs.pop("listen_host", "0.0.0.0")
        self.listen_port: int = kwargs.pop("listen_port", 80)
        self.keys: dict[str, bytes] = kwargs.pop("keys")
        self.policy: Policy = kwargs.pop("policy")
        self.allow_plain: bool = kwargs.pop("allow_plain", False)
        self.heartbeat: float = kwargs.pop("heartbeat", 25.0)
        self.heartbeat_misses: int = kwargs.pop("heartbeat_misses", 3)
        self.handshake_timeout: float = kwargs.pop("handshake_timeout", 10.0)
        self.connect_timeout: float = kwargs.pop("connect_timeout", 10.0)
        self.max_streams: int = kwargs.pop("max_streams", 50000)
        self.max_streams_per_key: int = kwargs.pop("max_streams_per_key", 20000)
        self.max_handshakes: int = kwargs.pop("max_handshakes", 1000)
        self.max_carriers: int = kwargs.pop("max_carriers", 2000)
        self.max_carriers_per_key: int = kwargs.pop("max_carriers_per_key", 200)
        self.max_buffered: int = kwargs.pop("max_buffered", 1 << 30)
        # TLS on the listener (None: plain TCP); the fingerprint is only logged.
        self.tls: Optional[ssl.SSLContext] = kwargs.pop("tls", None)
        self.tls_fingerprint: str = kwargs.pop("tls_fingerprint", "")
        self.tcp_keepalive: float = kwargs.pop("tcp_keepalive", 60.0)
        self.replay_buffer: int = kwargs.pop("replay_buffer", 4 * 1024 * 1024)
        self.resume_timeout: float = kwargs.pop("resume_timeout", 600.0)
        self.max_parked: int = kwargs.pop("max_parked", 10000)
        self.metrics_host: Optional[str] = kwargs.pop("metrics_host", None)
        self.metrics_port: int = kwargs.pop("metrics_port", 0)
        self.workers: int = kwargs.pop("workers", 1)
        if kwargs:
            raise TypeError(f"unknown exit settings: {', '.join(sorted(kwargs))}")

    @classmethod
    def from_config(cls, cfg: Any) -> ExitSettings:
        tls, tls_fingerprint = None, ""
        if cfg.tls_cert is not None:
            tls = server_context(cfg.tls_cert, cfg.tls_key)
            tls_fingerprint = cert_fingerprint(cfg.tls_cert)
        return cls(
            listen_host=cfg.listen.host,
            listen_port=cfg.listen.port,
            keys=load_keys(cfg.keys),
            policy=Policy(cfg.allow),
            allow_plain=cfg.allow_plain,
            heartbeat=cfg.heartbeat,
            heartbeat_misses=cfg.heartbeat_misses,
            handshake_timeout=cfg.handshake_timeout,
            connect_timeout=cfg.connect_timeout,
            max_streams=cfg.max_streams,
            max_streams_per_key=cfg.max_streams_per_key,
            max_handshakes=cfg.max_handshakes,
            max_carriers=cfg.max_carriers,
            max_carriers_per_key=cfg.max_carriers_per_key,
            max_buffered=cfg.max_buffered,
            tls=tls,
            tls_fingerprint=tls_fingerprint,
            tcp_keepalive=cfg.tcp_keepalive,
            replay_buffer=cfg.replay_buffer,
            resume_timeout=cfg.resume_timeout,
            max_parked=cfg.max_parked,
            metrics_host=cfg.metrics.host if cfg.metrics else None,
            metrics_port=cfg.metrics.port if cfg.metrics else 0,
            workers=cfg.workers,
        )

    def share(self, workers: int) -> ExitSettings:
        """The limits of one process of ``workers``: each its equal share (rounded up),
        so that the group together keeps about the configured totals."""
        for name in SHARED_LIMITS:
            total = getattr(self, name)
            setattr(self, name, -(-total // workers) if total > 0 else total)
        return self


SHARED_LIMITS = (
    "max_streams",
    "max_streams_per_key",
    "max_handshakes",
    "max_buffered",
    "max_parked",
    "max_carriers",
    "max_carriers_per_key",
)
"""The limits a --workers process enforces on its share: the configured value divided by N."""

"""What relay-worker reads, as one object that tests and the demo can build directly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from relay.net.sshhop import Login
from relay.net.tlslink import TlsClient, client_context
from relay.secrets import load_secret, load_userpass

log = logging.getLogger("relay.worker")


class WorkerSettings:
    """The knobs the worker reads, so tests and the demo need not build a whole config."""

    def __init__(self, **kwargs: Any) -> None:
        self.socks_host: str = kwargs.pop("socks_host", "127.0.0.1")
        self.socks_port: int = kwargs.pop("socks_port", 1080)
        self.socks_credentials: Optional[tuple[str, str]] = kwargs.pop("socks_credentials", None)
        self.logins: list[Login] = list(kwargs.pop("logins", []))
        self.ssh_client: str = kwargs.pop("ssh_client", "openssh")
        self.ssh_config: Optional[Path] = kwargs.pop("ssh_config", None)
        self.ssh_key: Optional[Path] = kwargs.pop("ssh_key", None)
        self.known_hosts: Optional[Path] = kwargs.pop("known_hosts", None)
        self.exits: list[tuple[str, int]] = list(kwargs.pop("exits", []))
        # TLS to the exits (None: plain TCP inside the SSH channel), see relay.tlslink.
        self.exit_tls: Optional[TlsClient] = kwargs.pop("exit_tls", None)
        self.key_id: str = kwargs.pop("key_id", "")
        self.secret: bytes = kwargs.pop("secret", b"")
        self.upstream: Optional[tuple[str, int]] = kwargs.pop("upstream", None)
        self.upstream_credentials: Optional[tuple[str, str]] = kwargs.pop(
            "upstream_credentials", None
        )
        self.heartbeat: float = kwargs.pop("heartbeat", 25.0)
        self.heartbeat_misses: int = kwargs.pop("heartbeat_misses", 3)
        self.ssh_keepalive: float = kwargs.pop("ssh_keepalive", 15.0)
        self.connect_timeout: float = kwargs.pop("connect_timeout", 15.0)
        self.reconnect_max: float = kwargs.pop("reconnect_max", 30.0)
        self.ssh_connect_rate: float = kwargs.pop("ssh_connect_rate", 4.0)
        self.resume_timeout: float = kwargs.pop("resume_timeout", 600.0)
        # Carriers kept open to each exit; every stream is multiplexed on them.
        self.carriers: int = kwargs.pop("carriers", 2)
        self.tcp_keepalive: float = kwargs.pop("tcp_keepalive", 60.0)
        self.replay_buffer: int = kwargs.pop("replay_buffer", 4 * 1024 * 1024)
        # Answer local clients at once and send their first bytes behind the CONNECT.
        self.optimistic: bool = kwargs.pop("optimistic", True)
        self.metrics_host: Optional[str] = kwargs.pop("metrics_host", None)
        self.metrics_port: int = kwargs.pop("metrics_port", 0)
        # HTTP CONNECT listener (None = off) and static forwards, see relay.listeners.
        self.http_host: Optional[str] = kwargs.pop("http_host", None)
        self.http_port: int = kwargs.pop("http_port", 0)
        self.forwards: list[tuple[str, int, str, int]] = list(kwargs.pop("forwards", []))
        if kwargs:
            raise TypeError(f"unknown worker settings: {', '.join(sorted(kwargs))}")

    @classmethod
    def from_config(cls, cfg: Any) -> WorkerSettings:
        upstream = (cfg.upstream.host, cfg.upstream.port) if cfg.upstream else None
        return cls(
            socks_host=cfg.socks.host,
            socks_port=cfg.socks.port,
            socks_credentials=None if cfg.no_socks_auth else load_userpass(cfg.socks_auth),
            logins=[Login(t.user, t.host, t.port) for t in cfg.login],
            ssh_client=cfg.ssh_client,
            ssh_config=cfg.ssh_config,
            ssh_key=cfg.ssh_key,
            known_hosts=cfg.known_hosts,
            exits=[(e.host, e.port) for e in cfg.exit],
            exit_tls=(
                TlsClient(client_context(cfg.exit_ca), cfg.exit_server_name, cfg.exit_fingerprint)
                if cfg.exit_ca is not None or cfg.exit_fingerprint
                else None
            ),
            key_id=cfg.key_id or "",
            secret=load_secret(cfg.secret_file) if cfg.secret_file else b"",
            upstream=upstream,
            upstream_credentials=(
                load_userpass(cfg.upstream_auth, "--upstream-auth") if cfg.upstream_auth else None
            ),
            heartbeat=cfg.heartbeat,
            heartbeat_misses=cfg.heartbeat_misses,
            ssh_keepalive=cfg.ssh_keepalive,
            connect_timeout=cfg.connect_timeout,
            reconnect_max=cfg.reconnect_max,
            ssh_connect_rate=cfg.ssh_connect_rate,
            resume_timeout=cfg.resume_timeout,
            carriers=cfg.carriers,
            tcp_keepalive=cfg.tcp_keepalive,
            replay_buffer=cfg.replay_buffer,
            optimistic=not cfg.no_optimistic,
            metrics_host=cfg.metrics.host if cfg.metrics else None,
            metrics_port=cfg.metrics.port if cfg.metrics else 0,
            http_host=cfg.http.host if cfg.http else None,
            http_port=cfg.http.port if cfg.http else 0,
            forwards=[(*f.listen, *f.dest) for f in cfg.forward],
        )

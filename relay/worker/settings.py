"""What relay-worker reads: the options of its schema table and what it derives from them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from relay.config.schema import WORKER_OPTIONS
from relay.config.secrets import load_secret, load_userpass
from relay.config.settings import Settings
from relay.config.values import ForwardTarget, HostPort, LoginTarget
from relay.net.tlslink import TlsClient, client_context


class WorkerSettings(Settings):
    """Every option of :data:`~relay.config.schema.WORKER_OPTIONS` as an attribute (defaults
    from the schema), plus the secret, the credentials and the TLS client read from them.

    The derived values are computed when the settings are built, so a bad secret file or CA
    stops the start with its one-line ConfigError.
    """

    OPTIONS = WORKER_OPTIONS
    ROLE = "worker"

    config: Optional[Path]
    socks: HostPort
    socks_auth: Optional[Path]
    no_socks_auth: bool
    http: Optional[HostPort]
    forward: tuple[ForwardTarget, ...]
    login: tuple[LoginTarget, ...]
    ssh_client: str
    ssh_config: Optional[Path]
    ssh_key: Optional[Path]
    known_hosts: Optional[Path]
    exit: tuple[HostPort, ...]
    exit_ca: Optional[Path]
    exit_fingerprint: tuple[bytes, ...]
    exit_server_name: Optional[str]
    key_id: Optional[str]
    secret_file: Optional[Path]
    upstream: Optional[HostPort]
    upstream_auth: Optional[Path]
    heartbeat: float
    heartbeat_misses: int
    ssh_keepalive: float
    connect_timeout: float
    reconnect_max: float
    no_optimistic: bool
    ssh_connect_rate: float
    ssh_connections: int
    resume_timeout: float
    carriers: int
    tcp_keepalive: float
    replay_buffer: int
    metrics: Optional[HostPort]
    log_format: str
    log_level: str
    no_uvloop: bool

    # derived
    secret: bytes
    """The shared secret from ``secret_file`` (empty without one)."""
    socks_credentials: Optional[tuple[str, str]]
    """USER, PASSWORD local clients must present (None: no password)."""
    upstream_credentials: Optional[tuple[str, str]]
    exit_tls: Optional[TlsClient]
    """TLS to the exits (None: plain TCP inside the SSH channel)."""

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        self.secret = load_secret(self.secret_file) if self.secret_file is not None else b""
        self.socks_credentials = None
        if self.socks_auth is not None and not self.no_socks_auth:
            self.socks_credentials = load_userpass(self.socks_auth)
        self.upstream_credentials = None
        if self.upstream_auth is not None:
            self.upstream_credentials = load_userpass(self.upstream_auth, "--upstream-auth")
        self.exit_tls = None
        if self.exit_ca is not None or self.exit_fingerprint:
            context = client_context(self.exit_ca)
            self.exit_tls = TlsClient(context, self.exit_server_name, self.exit_fingerprint)

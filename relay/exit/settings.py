"""What relay-exit reads: the options of its schema table and what it derives from them."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Optional

from relay.config.schema import EXIT_OPTIONS
from relay.config.secrets import check_private, load_keys
from relay.config.settings import Settings
from relay.config.values import HostPort, Rule
from relay.exit.policy import Policy
from relay.net.tlslink import cert_fingerprint, server_context


class ExitSettings(Settings):
    """Every option of :data:`~relay.config.schema.EXIT_OPTIONS` as an attribute (defaults from
    the schema), plus the key secrets, the policy and the TLS context read from them.

    The derived values are computed when the settings are built, so a bad key file or
    certificate stops the start (or a reload) with its one-line ConfigError.
    """

    OPTIONS = EXIT_OPTIONS
    ROLE = "exit"

    config: Optional[Path]
    listen: HostPort
    workers: int
    keys: Optional[Path]
    allow: tuple[Rule, ...]
    allow_plain: bool
    tls_cert: Optional[Path]
    tls_key: Optional[Path]
    metrics: Optional[HostPort]
    heartbeat: float
    heartbeat_misses: int
    handshake_timeout: float
    connect_timeout: float
    max_streams: int
    max_streams_per_key: int
    max_handshakes: int
    max_carriers: int
    max_carriers_per_key: int
    max_buffered: int
    tcp_keepalive: float
    replay_buffer: int
    resume_timeout: float
    max_parked: int
    log_format: str
    log_level: str
    no_uvloop: bool

    # derived
    secrets: dict[str, bytes]
    """KEY_ID -> SECRET from the ``keys`` file (none without one)."""
    policy: Policy
    tls: Optional[ssl.SSLContext]
    """TLS on the listener (None: plain TCP)."""
    tls_fingerprint: str
    """Of the certificate presented, for the log only."""

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        self.secrets = load_keys(self.keys) if self.keys is not None else {}
        self.policy = Policy(self.allow)
        self.tls, self.tls_fingerprint = None, ""
        if self.tls_cert is not None or self.tls_key is not None:
            if self.tls_cert is None or self.tls_key is None:
                raise TypeError("tls_cert and tls_key go together")
            # The loader checks it too; settings built without the loader must not skip it.
            check_private(self.tls_key, "--tls-key")
            self.tls = server_context(self.tls_cert, self.tls_key)
            self.tls_fingerprint = cert_fingerprint(self.tls_cert)

    def share(self, processes: int) -> ExitSettings:
        """The limits of one of ``processes``: each its equal share (rounded up), so that
        the group together keeps about the configured totals."""
        for name in SHARED_LIMITS:
            total = getattr(self, name)
            setattr(self, name, -(-total // processes) if total > 0 else total)
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

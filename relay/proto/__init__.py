"""Sans-IO protocol cores: bytes and time in, bytes and events out.

Nothing in this package touches a socket, an event loop or a clock, and nothing here imports
from the rest of :mod:`relay`; that is what makes these parsers fuzzable and the state machines
testable without a network.
"""

from __future__ import annotations

from relay.proto.errors import RelayError


class ProtocolError(RelayError):
    """The peer sent bytes that break the protocol; the connection must be closed."""

    reason = "protocol-error"

"""Errors shared by every layer above the protocol cores, under the one root
:class:`~relay.proto.errors.RelayError`."""

from __future__ import annotations

from typing import Optional

from relay.proto import socks5 as s5
from relay.proto.errors import RelayError

__all__ = ["ChannelRefused", "ConfigError", "DialFailed", "OpenFailed", "RelayError"]


class ConfigError(RelayError):
    """A configuration problem an operator must fix; the message names the key and the file."""

    reason = "config"


class OpenFailed(RelayError):
    """A stream could not be opened; ``code`` is the SOCKS5 reply for the local client.

    ``reason`` defaults to the stream's result in relay_streams_total."""

    code: int
    reason = "refused"

    def __init__(self, code: int, why: str, reason: Optional[str] = None) -> None:
        super().__init__(why, code=code, reason=reason)


class DialFailed(OpenFailed):
    """No carrier to the exit, so no stream: the local client gets a general failure.

    ``reason`` is the attempt's result in relay_carriers_total (``ssh-unavailable``,
    ``exit-unreachable``, ``tls-failed``, ``failed``); the error that caused it, as the
    transport or ssh reported it, is ``__cause__``, for ``relay check`` to explain."""

    def __init__(self, why: str, reason: str) -> None:
        super().__init__(s5.GENERAL_FAILURE, why, reason)


class ChannelRefused(RelayError, ConnectionError):
    """ssh (``--ssh-client openssh``) accepted a connection to its forward, then closed it:
    the login node refused the direct-tcpip channel; ``why`` is what ssh logged after
    "open failed:"."""

    code = s5.GENERAL_FAILURE
    reason = "exit-unreachable"

    def __init__(self, why: str) -> None:
        super().__init__(f"channel open failed: {why}")
        self.why = why

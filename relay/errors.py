"""Errors shared by every layer above the protocol cores."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem an operator must fix; the message names the key and the file."""


class OpenFailed(Exception):
    """A stream could not be opened; ``code`` is the SOCKS5 reply for the local client."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code

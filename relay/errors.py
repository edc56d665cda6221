"""Errors shared by every layer above the protocol cores."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem an operator must fix; the message names the key and the file."""

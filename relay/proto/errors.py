"""The root of every error hpc-relay raises on purpose.

It lives in :mod:`relay.proto` because the protocol cores may import nothing from the rest of
the package, and their :class:`~relay.proto.ProtocolError` is one of its branches.
"""

from __future__ import annotations

from typing import Optional


class RelayError(Exception):
    """An error the relay raises on purpose (not a bug).

    ``code`` is what the peer is told on the wire: a SOCKS5 reply code for stream, dial and
    policy errors, a HELLO status for a refused HELLO; None where nothing is sent. ``reason``
    is a short stable label, the one metrics and logs use for it. Both default to the class's
    and may be given per instance.
    """

    code: Optional[int] = None
    reason: str = "error"

    def __init__(
        self, *args: object, code: Optional[int] = None, reason: Optional[str] = None
    ) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason

"""Socket options that turn a silently vanished peer into an error instead of a hang."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any, Optional

KEEPALIVE_PROBES = 4


def keepalive_timings(idle: float) -> tuple[int, int, int]:
    """(idle, interval, count) in whole seconds for a keepalive budget starting at ``idle``."""
    idle_s = max(1, int(idle))
    interval = max(1, idle_s // 4)
    return idle_s, interval, KEEPALIVE_PROBES


def set_keepalive(sock: Optional[socket.socket], idle: float) -> None:
    """SO_KEEPALIVE with TCP_KEEPIDLE/INTVL/CNT, and TCP_USER_TIMEOUT to match.

    The user timeout bounds how long sent data may stay unacknowledged, so a peer that
    vanishes mid-transfer is detected as fast as one that vanishes while idle.
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle_s, interval, count = keepalive_timings(idle)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        if hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        if hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            timeout_ms = (idle_s + interval * count) * 1000
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)


def set_nodelay(sock: Optional[socket.socket]) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


QUICKACK_BELOW = 16384
"""Reads smaller than this are acknowledged at once (quickack, or an ACK frame where the
socket is an ssh process's): a bulk read is followed by more, whose ACKs come anyway."""


def quickack(sock: Any) -> None:
    """Acknowledge what has arrived at once instead of after the delayed-ACK timer.

    Linux clears TCP_QUICKACK again by itself, so callers set it after each receive that
    may be followed by more small packets from a peer that waits for our ACK (Nagle).
    """
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def transport_socket(transport: Any) -> Optional[socket.socket]:
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock if isinstance(sock, socket.socket) or hasattr(sock, "setsockopt") else None


def abort_with_reset(transport: Any) -> None:
    """Close so the peer sees a TCP reset (SO_LINGER 0), as it would have without the relay."""
    if transport is None or transport.is_closing():
        if transport is not None:
            transport.abort()
        return
    sock = transport_socket(transport)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def set_notsent_lowat(sock: Optional[socket.socket], limit: int) -> None:
    """Let the kernel hold at most ``limit`` unsent bytes: the scheduler above it, not the
    socket buffer, decides the order of frames."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit)

"""A duplicate of a child process's TCP connection (Linux ``pidfd_getfd``, kernel 5.6+).

The worker's ``ssh`` owns the TCP connection to the login node, and sshd on a connection
without a pty sends small packets with Nagle's algorithm on: each waits until the one before
is acknowledged. ``ssh`` acknowledges late (delayed ACK), so concurrent stream set-ups queue.
Holding a duplicate of ssh's socket (the same socket, not a copy) lets the worker switch on
``TCP_QUICKACK`` after a small read, as it does on its own asyncssh socket. The duplicate is
only ever used for socket options: reading or writing it would take bytes from ssh.

Where the kernel or its policy refuses (no ``pidfd_getfd``, Yama ptrace scope 2 or 3, a
seccomp filter), or ssh has no TCP socket of its own (ProxyJump, ProxyCommand), there is no
duplicate and the worker does without.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
from typing import Optional

_SYS_PIDFD_GETFD = 438
"""The same number on every Linux architecture (added after the syscall table unification)."""


def borrow_tcp_socket(pid: int) -> Optional[socket.socket]:
    """A duplicate of the (first) connected TCP socket of process ``pid``, or None."""
    found = None
    for sock in tcp_sockets(pid):
        if found is None and _connected(sock):
            found = sock
        else:
            sock.close()
    return found


def tcp_sockets(pid: int) -> list[socket.socket]:
    """Duplicates of every TCP socket of process ``pid`` (listening ones too), in the order
    of their descriptors; empty where the system refuses."""
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return []
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return []
    found: list[socket.socket] = []
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in _socket_fds(pid):
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, name, 0)
            if fd < 0:
                if ctypes.get_errno() in (1, 38):  # EPERM, ENOSYS: none of them will do
                    break
                continue
            sock = _tcp(fd)
            if sock is not None:
                found.append(sock)
    finally:
        os.close(pidfd)
    return found


def _socket_fds(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    found.append(int(name))
    return sorted(found)


def _tcp(fd: int) -> Optional[socket.socket]:
    """``fd`` as a socket object if it is a TCP socket; otherwise closed, None."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        return sock
    sock.close()
    return None


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True

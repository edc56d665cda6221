"""Pieces shared by the bench's processes: the payload pattern, its digest, a hashing receiver.

The payload is a 16 MiB pseudo-random block repeated (random, so no layer can compress it;
repeated, so a sender needs no CPU to produce it). Every bulk transfer is checked end to end
with SHA-256 of exactly the bytes sent.
"""

from __future__ import annotations

import hashlib
import queue
import random
import socket
import threading
from functools import lru_cache

BLOCK = 16 << 20
SEED = 0x5EED_BE4C
CHUNK = 1 << 20


@lru_cache(maxsize=1)
def pattern() -> memoryview:
    return memoryview(random.Random(SEED).randbytes(BLOCK))


def expected_digest(size: int) -> str:
    """SHA-256 of the first ``size`` bytes of the repeated pattern."""
    h = hashlib.sha256()
    block = pattern()
    left = size
    while left > 0:
        n = min(left, BLOCK)
        h.update(block[:n])
        left -= n
    return h.hexdigest()


def send_pattern(sock: socket.socket, size: int) -> None:
    block = pattern()
    left = size
    while left > 0:
        n = min(left, BLOCK)
        sock.sendall(block[:n])
        left -= n


def recv_hash(
    sock: socket.socket, prefix: bytes = b"", limit: int | None = None
) -> tuple[int, str]:
    """Receive until EOF (or ``limit`` bytes), hashing in a second thread so the hash overlaps
    the next recv (hashlib drops the GIL for large updates). Returns (bytes, sha256 hex)."""
    h = hashlib.sha256()
    h.update(prefix)
    got = len(prefix)
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(8):
        free.put(bytearray(CHUNK))
    work: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()

    def hasher() -> None:
        while (item := work.get()) is not None:
            buf, n = item
            h.update(memoryview(buf)[:n])
            free.put(buf)

    thread = threading.Thread(target=hasher, daemon=True)
    thread.start()
    try:
        while limit is None or got < limit:
            buf = free.get()
            want = CHUNK if limit is None else min(CHUNK, limit - got)
            n = sock.recv_into(buf, want)
            if n == 0:
                free.put(buf)
                break
            work.put((buf, n))
            got += n
    finally:
        work.put(None)
        thread.join()
    return got, h.hexdigest()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_async(main: object) -> object:
    """Run a coroutine on uvloop when installed (as the relay daemons do), else asyncio."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]

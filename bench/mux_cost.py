"""CPU cost of the v2 mux layer alone, in memory: one worker session and one exit session,
bytes pushed through a carrier in 256 KiB application writes, with and without sealing.

    python -m bench.mux_cost [--mib 512] [--repeats 5]

Prints CPU seconds per GiB (time.process_time, median of the repeats) for both ends
together: framing, the fair scheduler, offsets and acknowledgements, and AES-GCM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from relay.proto import seal
from relay.proto import session as ms

ADDRESS = b"\x01\x7f\x00\x00\x01\x25\x92"
WRITE = 256 * 1024
SESSION: dict[str, Any] = {"misses": 3, "window": 4 * 1024 * 1024, "tombstone_ttl": 600.0}
"""The daemons' defaults (relay.config.schema), as a session of either end gets them."""


def _pair(sealed: bool) -> tuple[ms.Session, ms.Session]:
    worker = ms.Session(ms.WORKER, heartbeat=25.0, now=0.0, **SESSION)
    exit_ = ms.Session(ms.EXIT, heartbeat=25.0, now=0.0, **SESSION)
    if sealed:
        to_exit, to_worker = seal.derive_keys(os.urandom(32), os.urandom(16), os.urandom(16))
        worker.add_carrier(1, seal.Sealer(to_exit), seal.Unsealer(to_worker), 0.0)
        exit_.add_carrier(1, seal.Sealer(to_worker), seal.Unsealer(to_exit), 0.0)
    else:
        worker.add_carrier(1, None, None, 0.0)
        exit_.add_carrier(1, None, None, 0.0)
    return worker, exit_


def run(total: int, sealed: bool) -> float:
    """CPU seconds to move ``total`` bytes worker -> exit (exit acknowledging)."""
    worker, exit_ = _pair(sealed)
    sid = worker.open(ADDRESS)
    for piece in worker.output(1, 0.0):
        exit_.receive(1, bytes(piece), 0.0)
    exit_.answer(sid, 0)
    for piece in exit_.output(1, 0.0):
        worker.receive(1, bytes(piece), 0.0)
    chunk = os.urandom(WRITE)
    moved = 0
    start = time.process_time()
    while moved < total:
        worker.send(sid, chunk)
        moved += len(chunk)
        while True:
            pieces = worker.output(1, 0.0, 256 * 1024)
            if not pieces:
                break
            wire = b"".join(pieces)  # what one socket write would carry
            for event in exit_.receive(1, wire, 0.0):
                assert isinstance(event, (ms.Received, ms.Writable))
            acks = exit_.output(1, 0.0)
            if acks:
                worker.receive(1, b"".join(acks), 0.0)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    total = args.mib << 20
    print(f"| mux layer, {args.mib} MiB per run, median of {args.repeats} | CPU s per GiB |")
    print("|---|---|")
    for sealed in (False, True):
        runs = [run(total, sealed) for _ in range(args.repeats)]
        per_gib = statistics.median(runs) * (1 << 30) / total
        label = "framing + scheduler + offsets" + (" + AES-256-GCM" if sealed else "")
        print(f"| {label} | {per_gib:.2f} |")


if __name__ == "__main__":
    main()

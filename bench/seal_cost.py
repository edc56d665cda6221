"""CPU cost of the sealed record layer: seconds per GiB of plaintext sealed, then unsealed.

    python -m bench.seal_cost [--mib N] [--runs 5]

Each row seals N MiB in pieces of one size, some number of pieces per :meth:`Sealer.seal`
call (the records are dropped as soon as sealed, as after a socket write), then feeds the same
wire stream to an :class:`Unsealer` in 64 KiB reads, as a socket would hand it over. Times are
``time.process_time`` of this process (user and system), the median of ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend

from relay.proto.seal import Sealer, Unsealer

KEY = bytes(range(32))
READ_SIZE = 64 * 1024
GIB = 1 << 30

# (label, piece size, pieces per seal call)
CASES = [
    ("64 KiB pieces, 1 per call", 64 * 1024, 1),
    ("1 KiB pieces, 64 per call", 1024, 64),
    ("1 KiB pieces, 1 per call", 1024, 1),
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(piece: int, per_call: int, total: int, runs: int) -> tuple[float, float, int]:
    """Median CPU seconds to seal and to unseal ``total`` bytes, and the wire size."""
    data = os.urandom(total)
    pieces = [data[i : i + piece] for i in range(0, total, piece)]
    calls = [pieces[i : i + per_call] for i in range(0, len(pieces), per_call)]
    seal_times: list[float] = []
    open_times: list[float] = []
    wire_size = 0
    for _ in range(runs):
        seal = Sealer(KEY).seal
        t0 = time.process_time()
        for call in calls:
            seal(call)  # sent and freed at once, as a socket write would
        seal_times.append(time.process_time() - t0)

        seal = Sealer(KEY).seal  # the same key from 0 again: the same stream, kept to unseal
        out: list[bytes] = []
        for call in calls:
            out += seal(call)
        wire = b"".join(out)
        del out
        wire_size = len(wire)
        reads = [wire[i : i + READ_SIZE] for i in range(0, len(wire), READ_SIZE)]
        del wire
        feed = Unsealer(KEY).feed
        got = 0
        t0 = time.process_time()
        for chunk in reads:
            for plain in feed(chunk):
                got += len(plain)
        open_times.append(time.process_time() - t0)
        del reads
        if got != total:
            raise SystemExit(f"unsealed {got} bytes of {total}")
    return statistics.median(seal_times), statistics.median(open_times), wire_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="plaintext per run (default 128)")
    parser.add_argument("--runs", type=int, default=5, help="runs per row, median (default 5)")
    args = parser.parse_args()
    total = args.mib << 20
    print(
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}, "
        f"{backend.openssl_version_text()}, {_cpu_model()}"
    )
    print(
        f"{args.mib} MiB per run, median of {args.runs}, unsealed from {READ_SIZE >> 10} KiB reads"
    )
    print()
    header = (
        f"{'case':<28} {'seal s/GiB':>10} {'unseal s/GiB':>12} {'total s/GiB':>11} {'wire +%':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, piece, per_call in CASES:
        seal_s, open_s, wire = measure(piece, per_call, total, args.runs)
        scale = GIB / total
        print(
            f"{label:<28} {seal_s * scale:>10.3f} {open_s * scale:>12.3f} "
            f"{(seal_s + open_s) * scale:>11.3f} {100 * (wire - total) / total:>8.2f}"
        )


if __name__ == "__main__":
    main()

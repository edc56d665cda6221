"""Setup latency of fresh streams next to a bulk download on the same worker, in the lab.

    python -m bench.lab_fairness [--chain relay-openssh] [--count 40] [--size-mib 1536]

Builds the lab of ``bench.lab_chains`` with one chain, measures the setup latency of
``--count`` fresh streams (TCP connect to the first echoed byte) on the idle chain, then again
while a download (SHA-256 checked) runs through the same chain, and prints one JSON line with
p50 / p90 / max of both and the download's MB/s. A stream opened next to a bulk one waits
behind the bytes queued ahead of its OPEN and its REPLY: the fair scheduler's step, the
carriers' buffers and the SSH hop's. Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any, Optional

from bench.lab_chains import ALL_CHAINS, bench_as_root


def _summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lab_fairness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--chain", default="relay-openssh", choices=ALL_CHAINS)
    parser.add_argument("--count", type=int, default=40, help="streams per measurement")
    parser.add_argument("--size-mib", type=int, default=1536, help="MiB of the download")
    args = parser.parse_args(argv)
    bench = bench_as_root("lab-fairness-")
    try:
        bench.start([args.chain])
        chain = bench.chains[args.chain]
        idle = bench.latency(chain, args.count)
        done: dict[str, Any] = {}

        def download() -> None:
            done["down"] = bench.transfer(chain, "down", args.size_mib << 20)

        bulk = threading.Thread(target=download)
        bulk.start()
        time.sleep(1.5)  # the download is at full speed
        busy = bench.latency(chain, args.count)
        bulk.join()
        if "down" not in done:
            print("the download failed (see above)", file=sys.stderr)
            return 1
        print(
            json.dumps(
                {
                    "chain": args.chain,
                    "idle": _summary(idle["samples_ms"]),
                    "next_to_download": _summary(busy["samples_ms"]),
                    "download_mb_per_s": round(done["down"]["mb_per_s"]),
                }
            ),
            flush=True,
        )
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

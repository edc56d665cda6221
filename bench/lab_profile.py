"""Where the relay's CPU goes in the namespace lab: py-spy on relay-worker and relay-exit.

    python -m bench.lab_profile [--chain relay-openssh] [--size-mib 256] [--native] [--perf]
                                [--out DIR]

Builds the lab of ``bench.lab_chains`` with one relay chain, then samples the worker and the
exit with ``py-spy record`` while a download and an upload (SHA-256 checked) run through it,
and writes per workload and daemon the collapsed stacks and ``profile.md`` (top frames by own
and by inclusive time, the CPU seconds of every process of the chain). Shares are of each
daemon's busy time: py-spy samples running threads only. ``--perf`` also records every process
of the chain (ssh and sshd too) with ``perf record`` and writes where their CPU goes by process,
library and symbol, kernel included (``perf-<workload>.txt``). Needs root.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from bench.lab_chains import ALL_CHAINS, bench_as_root, cpu_delta
from bench.profile import Profiler, summaries, write_report

REPO = Path(__file__).resolve().parent.parent


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lab_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    relays = [n for n in ALL_CHAINS if n.startswith("relay-")]
    parser.add_argument("--chain", default="relay-openssh", choices=relays)
    parser.add_argument("--size-mib", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="also sample C frames")
    parser.add_argument("--perf", action="store_true", help="also run perf record on the chain")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs perf (Debian: linux-perf)")
    bench = bench_as_root("lab-profile-")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "bench" / "results" / f"{stamp}-lab-profile"
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.lab_profile " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {"command": command, "started": stamp, "workloads": {}}
    size = args.size_mib << 20
    try:
        bench.start([args.chain])
        chain = bench.chains[args.chain]
        report["relay"] = chain.description
        bench.latency(chain, 3)  # the carriers exist before sampling starts
        for direction in ("down", "up"):
            name = f"bulk-{direction}"
            prof = Profiler(out, args.rate, args.native)
            daemons = {d: chain.roles[d][0] for d in ("worker", "exit")}
            before = chain.snapshot()
            for daemon, pid in daemons.items():
                prof.start(pid, f"{name}-{daemon}")
            perf = _start_perf(out / f"perf-{name}.data", before) if args.perf else None
            time.sleep(1.0)  # py-spy attaches
            started = time.perf_counter()
            try:
                res = bench.transfer(chain, direction, size)
            finally:
                prof.stop()
                if perf is not None:
                    _stop_perf(perf, out / f"perf-{name}.data", out / f"perf-{name}.txt")
            totals, _ = cpu_delta(before, chain.snapshot(), list(chain.roles))
            entry: dict[str, Any] = {
                "client": {"mb_per_s": round(res["mb_per_s"], 1), "ok": res["ok"]},
                "wall_seconds": time.perf_counter() - started,
                "cpu_seconds": totals,
                "daemons": summaries(out, name, daemons),
            }
            report["workloads"][name] = entry
            print(f"{name}: {entry['client']}; CPU {totals}", flush=True)
    finally:
        bench.close()
    write_report(out, report)
    return 0


def _start_perf(data: Path, processes: dict[int, Any]) -> subprocess.Popen[Any]:
    pids = ",".join(str(pid) for pid in processes)
    argv = ["perf", "record", "-q", "-F", "999", "-p", pids, "-o", str(data)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_perf(proc: subprocess.Popen[Any], data: Path, text: Path) -> None:
    """Where the samples fell: by process and library, then the top symbols of each."""
    proc.send_signal(2)
    proc.wait(timeout=60)
    reports = []
    for sort in ("comm,dso", "comm,dso,sym"):
        argv = ["perf", "report", "-i", str(data), "--sort", sort, "--stdio"]
        res = subprocess.run(
            [*argv, "--percent-limit", "0.5"],
            capture_output=True,
            text=True,
            check=False,
        )
        reports.append(res.stdout)
    text.write_text("\n".join(reports))
    data.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())

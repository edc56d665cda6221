"""Where the relay's CPU goes: py-spy on relay-worker and relay-exit under bench workloads.

    python -m bench.profile [--size BYTES] [--count N] [--native] [--relay-rev REV] [--out DIR]

Sets up the relay chain as the bench does (real sshd, daemons from their console scripts),
samples both daemons with ``py-spy record`` while one workload runs (bulk up, bulk down, setup
latency), and writes per workload and daemon the raw collapsed stacks (they load into
speedscope or inferno as they are) and ``profile.md`` with the top frames by own time and by
inclusive time. py-spy samples only running threads: shares are of the daemon's busy time.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from bench import procstat
from bench.chains import BIN, REPO, Bench
from bench.common import expected_digest
from bench.run import describe_source, relay_source

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``; site-packages prefix dropped."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", "/relay-src/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Own-time and inclusive-time shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
    return {
        "samples": total,
        "own": [(f, n / total) for f, n in own.most_common(top)] if total else [],
        "inclusive": [(f, n / total) for f, n in incl.most_common(top)] if total else [],
    }


class Profiler:
    def __init__(self, out: Path, rate: int, native: bool) -> None:
        self.out = out
        self.rate = rate
        self.native = native
        self.procs: list[tuple[subprocess.Popen[Any], str]] = []

    def start(self, pid: int, name: str) -> None:
        raw = self.out / f"{name}.txt"
        argv = [
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ]
        if self.native:
            # native unwinding needs the target stopped while sampled: more overhead
            argv.remove("--nonblocking")
            argv.append("--native")
        log = (self.out / f"{name}.py-spy.log").open("w")
        self.procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), name))

    def stop(self) -> None:
        for proc, _ in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes per bulk transfer")
    parser.add_argument("--count", type=int, default=300, help="connections for the setup run")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="also sample C frames")
    parser.add_argument("--relay-rev", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "bench" / "results" / f"{stamp}-profile"
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="hrbench-prof-"))
    bench = Bench(workdir, relay_source(args.relay_rev, workdir))
    command = "python -m bench.profile " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "command": command,
        "started": stamp,
        "relay": describe_source(args.relay_rev) or "work tree",
        "workloads": {},
    }
    try:
        bench.start_sink()
        chain = bench.add_relay()
        digest = expected_digest(args.size)
        workloads = {
            "bulk-up": [
                "up",
                "--port",
                str(bench.bulk_port),
                "--size",
                str(args.size),
                "--expect",
                digest,
            ],
            "bulk-down": [
                "down",
                "--port",
                str(bench.bulk_port),
                "--size",
                str(args.size),
                "--expect",
                digest,
            ],
            "setup": ["latency", "--port", str(bench.echo_port), "--count", str(args.count)],
        }
        # one untimed connection so the SSH connection exists before sampling starts
        subprocess.run(
            chain.wrap(
                [
                    sys.executable,
                    "-m",
                    "bench.client",
                    "latency",
                    "--port",
                    str(bench.echo_port),
                    "--count",
                    "3",
                ]
            ),
            env=bench.env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        for name, client_args in workloads.items():
            prof = Profiler(out, args.rate, args.native)
            daemons = {"worker": chain.roles["relay-worker"], "exit": chain.roles["relay-exit"]}
            cpu0 = {d: procstat.tree_cpu([p]) for d, p in daemons.items()}
            cpu0["sshd"] = procstat.tree_cpu([chain.roles["sshd"]])
            for daemon, pid in daemons.items():
                prof.start(pid, f"{name}-{daemon}")
            time.sleep(1.0)  # py-spy attaches
            started = time.perf_counter()
            res = subprocess.run(
                chain.wrap([sys.executable, "-m", "bench.client", *client_args]),
                env=bench.env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            elapsed = time.perf_counter() - started
            prof.stop()
            cpu1 = {d: procstat.tree_cpu([p]) for d, p in daemons.items()}
            cpu1["sshd"] = procstat.tree_cpu([chain.roles["sshd"]])
            result = json.loads(res.stdout)
            if "samples" in result:
                s = sorted(result["samples"])
                result = {
                    "median_ms": 1000 * s[len(s) // 2],
                    "n": len(s),
                    "errors": result["errors"],
                }
            entry: dict[str, Any] = {
                "client": result,
                "wall_seconds": elapsed,
                "cpu_seconds": {d: cpu1[d] - cpu0[d] for d in cpu0},
                "daemons": {},
            }
            entry["daemons"] = summaries(out, name, daemons)
            report["workloads"][name] = entry
            print(f"{name}: {result}; CPU {entry['cpu_seconds']}", flush=True)
    finally:
        bench.close()
    write_report(out, report)
    return 0


def summaries(out: Path, workload: str, daemons: Iterable[str]) -> dict[str, Any]:
    """Each daemon's py-spy summary of ``workload`` (Profiler wrote its raw file in ``out``)."""
    found: dict[str, Any] = {}
    for daemon in daemons:
        raw = out / f"{workload}-{daemon}.txt"
        if not raw.exists():
            log = (out / f"{workload}-{daemon}.py-spy.log").read_text()
            raise RuntimeError(f"py-spy wrote no profile for {daemon}: {log}")
        found[daemon] = summarize(raw)
    return found


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    (out / "profile.md").write_text(markdown(report))
    print(out / "profile.md")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### Profile `{report['started']}`\n",
        f"Command: `{report['command']}`; relay: {report.get('relay', '?')}\n",
    ]
    for name, w in report["workloads"].items():
        cpu = ", ".join(f"{d} {s:.2f} s" for d, s in w["cpu_seconds"].items())
        lines.append(
            f"#### {name}\n\nClient result: `{json.dumps(w['client'])}`; wall "
            f"{w['wall_seconds']:.1f} s; CPU {cpu}.\n"
        )
        for daemon, s in w["daemons"].items():
            lines.append(f"{daemon} ({s['samples']} samples while busy), top frames by own time:\n")
            lines.append("| own | function |\n|---|---|")
            lines += [f"| {share:.1%} | `{f}` |" for f, share in s["own"][:12]]
            lines.append(f"\n{daemon}, top frames by inclusive time:\n")
            lines.append("| inclusive | function |\n|---|---|")
            lines += [f"| {share:.1%} | `{f}` |" for f, share in s["inclusive"][:15]]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

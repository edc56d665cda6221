"""The bench: the relay next to the chain it replaces, in two settings, one after the other.

    python -m bench --quick                # a few minutes, small sizes (make bench-quick)
    python -m bench --full --update-docs   # the full run (make bench)

1. The namespace lab (primary; bench/lab_chains.py): compute node, login node with a real sshd,
   nftables firewall and outside in network namespaces joined by veth links. Chains: relay
   (openssh client), relay (asyncssh client), relay with ssh_connections = 2 (when the worker
   has that option), old chain (ssh -D + danted, default cipher), old chain with aes128-gcm.
   Per chain: download and upload MB/s, CPU seconds per GiB over all the chain's processes
   and per process, setup latency p50/p90, new streams per second from concurrent client
   loops. Every chain is measured in every round, the order rotated from round to round;
   the figures are medians over rounds.
2. Loopback (second): every chain on 127.0.0.1, also pproxy and direct: bulk, setup latency,
   setup under an emulated WAN, connection rate, idle streams. Loopback flatters a Python
   relay (no NIC, no firewall, one kernel's TCP stack on both ends), so its table comes second.

Every transfer is SHA-256 checked end to end; a mismatch fails the run (exit status 1, docs
left as they were). Needs root (namespaces, nftables, sshd) and the Debian packages of
bench/install-debs.

Results go to ``bench/results/<UTC time>-<mode>/``: ``results.json`` (every raw sample of both
settings), ``summary.md`` (both tables, the lab first), ``lab/summary.md`` (the lab in detail)
and PNG plots of the loopback figures; ``--update-docs`` also puts the summary into
docs/PERFORMANCE.md between its ``bench:begin``/``bench:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from bench import lab_chains, procstat
from bench.chains import REPO, Bench, Chain
from bench.common import expected_digest, free_port
from bench.lab_chains import BenchFailure

RESULTS = REPO / "bench" / "results"

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "bulk_size": 64 << 20,
        "bulk_reps": 3,
        "lat_count": 100,
        "lat_blocks": 2,
        "wan_count": 20,
        "wan_blocks": 2,
        "rate_seconds": 2.0,
        "rate_rounds": 1,
        "rate_procs": 4,
        "idle": {"relay": 300, "old-chain": 100},
        "idle_window": 5.0,
        "relay_worker_config": {},
        "relay_exit_config": {},
        # the namespace lab (bench.lab_chains)
        "lab_size_mib": 64,
        "lab_rounds": 1,
        "lab_latency_count": 20,
        "lab_rate_seconds": 2.0,
        "lab_rate_parallel": 4,
    },
    "full": {
        "bulk_size": 1 << 30,
        "bulk_reps": 5,
        "lat_count": 500,
        "lat_blocks": 5,
        "wan_count": 300,
        "wan_blocks": 3,
        "rate_seconds": 5.0,
        "rate_rounds": 3,
        "rate_procs": 8,
        # 9,900 rather than 10,000: the exit holds two sockets per stream and this machine's
        # hard RLIMIT_NOFILE is 20,000 (no CAP_SYS_RESOURCE to raise it); see the summary.
        "idle": {"relay": 9900, "old-chain": 1000, "pproxy": 1000},
        "idle_window": 60.0,
        # extra keys for the relay's TOML files, e.g. {"heartbeat": 300}, for experiments
        "relay_worker_config": {},
        "relay_exit_config": {},
        "lab_size_mib": 256,
        "lab_rounds": 5,
        "lab_latency_count": 50,
        "lab_rate_seconds": 5.0,
        "lab_rate_parallel": 8,
    },
}

CHAINS = ("direct", "old-chain", "old-chain-gcm", "relay", "pproxy")
SETTINGS = ("lab", "loopback")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _deb(pkg: str) -> str:
    return _cmd(["dpkg-query", "-W", "-f", "${Version}", pkg])


def machine(relay_rev: Optional[str]) -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    git_rev = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "relay"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(int(mem) / (1 << 20), 1),
        "kernel": platform.release(),
        "os": _cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "openssh": _cmd(["ssh", "-V"]),
        "dante": _deb("dante-server"),
        "proxychains4": _deb("proxychains4"),
        "iperf3": _deb("iperf3"),
        "asyncssh": _version("asyncssh"),
        "uvloop": _version("uvloop"),
        "cryptography": _version("cryptography"),
        "pproxy": _version("pproxy"),
        "relay": describe_source(relay_rev)
        or f"{git_rev} (work tree{', relay/ modified' if dirty else ''})",
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


class Runner:
    def __init__(self, bench: Bench, params: dict[str, Any], deadline: float) -> None:
        self.b = bench
        self.p = params
        self.deadline = deadline
        self.results: dict[str, Any] = {}
        self.iperf_port = 0

    def chains(self) -> list[Chain]:
        """Every chain set up, in a fixed order (the A B C of each interleaved round)."""
        return list(self.b.chains.values())

    def cpu(self, chain: Chain) -> dict[str, float]:
        return {role: procstat.tree_cpu([pid]) for role, pid in chain.roles.items()}

    def client(
        self, chain: Chain, args: list[str], wan: bool = False, timeout: float = 600
    ) -> tuple[dict[str, Any], float]:
        """Run one client process; returns its JSON and its own CPU seconds."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = chain.wrap([sys.executable, "-m", "bench.client", *args], wan=wan)
        out = subprocess.run(
            argv, capture_output=True, text=True, env=self.b.env, timeout=timeout, check=False
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        try:
            return json.loads(out.stdout), own
        except json.JSONDecodeError:
            raise RuntimeError(
                f"{chain.name} client {args[0]} failed: {out.stderr[-2000:]}"
            ) from None

    def out_of_time(self, what: str) -> bool:
        if time.monotonic() > self.deadline:
            log(f"time budget spent: skipping the rest of {what}")
            self.results.setdefault("skipped", []).append(what)
            return True
        return False

    # -- bulk -----------------------------------------------------------------------------
    def bulk(self) -> None:
        size, reps = self.p["bulk_size"], self.p["bulk_reps"]
        digest = expected_digest(size)
        res: dict[str, dict[str, list[Any]]] = {}
        self.iperf_port = free_port()
        self.b.spawn(
            "iperf3-server",
            ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
            port=self.iperf_port,
        )
        for rep in range(reps):
            if self.out_of_time("bulk"):
                break
            for direction in ("up", "down"):
                res.setdefault("direct-iperf3", {}).setdefault(direction, []).append(
                    self.iperf(size, direction)
                )
                for chain in self.chains():
                    run = self.bulk_one(chain, direction, size, digest)
                    res.setdefault(chain.name, {}).setdefault(direction, []).append(run)
                    log(
                        f"bulk {rep + 1}/{reps} {direction:4} {chain.name:14} "
                        f"{run['mb_s']:7.0f} MB/s  chain CPU {run['cpu_per_gib']:.2f} s/GiB"
                        f"{'' if run['ok'] else '  CHECKSUM/LENGTH MISMATCH'}"
                    )
                    if not run["ok"]:
                        self.results["bulk"] = {"size": size, "sha256": digest, "runs": res}
                        raise BenchFailure(
                            f"loopback {chain.name} {direction} {size} bytes FAILED the "
                            "end-to-end check (SHA-256 or length)"
                        )
        self.results["bulk"] = {"size": size, "sha256": digest, "runs": res}

    def iperf(self, size: int, direction: str) -> dict[str, Any]:
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(self.iperf_port), "-n", str(size), "-J"]
        if direction == "down":
            argv.append("-R")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        data = json.loads(out.stdout)
        bps = data["end"]["sum_received"]["bits_per_second"]
        return {"mb_s": bps / 8 / 1e6, "ok": None, "cpu_per_gib": 0.0, "cpu": {}}

    def bulk_one(self, chain: Chain, direction: str, size: int, digest: str) -> dict[str, Any]:
        cpu0, sink0 = self.cpu(chain), procstat.tree_cpu([self.b.sink_pid])
        result, client_cpu = self.client(
            chain,
            [direction, "--port", str(self.b.bulk_port), "--size", str(size), "--expect", digest],
        )
        cpu1, sink1 = self.cpu(chain), procstat.tree_cpu([self.b.sink_pid])
        cpu = {role: round(cpu1[role] - cpu0[role], 3) for role in cpu0}
        total = sum(cpu.values())
        return {
            "mb_s": result["bytes"] / result["seconds"] / 1e6,
            "seconds": result["seconds"],
            "ok": bool(result["ok"]),
            "cpu": cpu,
            "cpu_total": round(total, 3),
            "cpu_per_gib": total / (size / (1 << 30)),
            "client_cpu": round(client_cpu, 3),
            "sink_cpu": round(sink1 - sink0, 3),
        }

    # -- setup latency --------------------------------------------------------------------
    def latency(self, wan: bool) -> None:
        key = "wan" if wan else "latency"
        count = self.p["wan_count" if wan else "lat_count"]
        blocks = self.p["wan_blocks" if wan else "lat_blocks"]
        per = max(1, count // blocks)
        port = self.b.wan_echo_port if wan else self.b.echo_port
        res: dict[str, dict[str, Any]] = {}
        for block in range(blocks):
            if self.out_of_time(key):
                break
            for chain in self.chains():
                cpu0 = self.cpu(chain)
                result, _ = self.client(
                    chain, ["latency", "--port", str(port), "--count", str(per)], wan=wan
                )
                cpu1 = self.cpu(chain)
                samples = result["samples"]
                entry = res.setdefault(chain.name, {"samples": [], "blocks": [], "errors": 0})
                entry["samples"].extend(round(s, 7) for s in samples)
                entry["errors"] += result["errors"]
                cpu = sum(cpu1[r] - cpu0[r] for r in cpu0)
                entry["blocks"].append(
                    {
                        "median": statistics.median(samples) if samples else None,
                        "count": len(samples),
                        "cpu_ms_per_conn": 1000 * cpu / max(1, len(samples)),
                    }
                )
                med = statistics.median(samples) * 1000 if samples else float("nan")
                log(
                    f"{key} {block + 1}/{blocks} {chain.name:14} median {med:8.3f} ms"
                    f" ({len(samples)} ok, {result['errors']} errors)"
                )
        self.results[key] = res

    # -- connection rate ------------------------------------------------------------------
    def rate(self) -> None:
        seconds, procs = self.p["rate_seconds"], self.p["rate_procs"]
        res: dict[str, list[Any]] = {}
        for rnd in range(self.p["rate_rounds"]):
            if self.out_of_time("rate"):
                break
            for chain in self.chains():
                start_at = time.time() + 1.5
                argv = chain.wrap(
                    [
                        sys.executable,
                        "-m",
                        "bench.client",
                        "rate",
                        "--port",
                        str(self.b.echo_port),
                        "--start-at",
                        str(start_at),
                        "--seconds",
                        str(seconds),
                    ]
                )
                popens = [
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=self.b.env,
                    )
                    for _ in range(procs)
                ]
                time.sleep(max(0.0, start_at - time.time()))
                cpu0 = self.cpu(chain)
                outs = [p.communicate(timeout=seconds + 120) for p in popens]
                cpu1 = self.cpu(chain)
                ok = errors = 0
                took = 0.0
                for out, err in outs:
                    try:
                        data = json.loads(out)
                    except json.JSONDecodeError:
                        raise RuntimeError(
                            f"{chain.name} rate client failed: {err[-2000:]}"
                        ) from None
                    ok, errors = ok + data["ok"], errors + data["errors"]
                    took = max(took, data["seconds"])
                cpu = sum(cpu1[r] - cpu0[r] for r in cpu0)
                run = {
                    "cps": ok / took,
                    "ok": ok,
                    "errors": errors,
                    "seconds": took,
                    "procs": procs,
                    "cpu_ms_per_conn": 1000 * cpu / max(1, ok),
                }
                res.setdefault(chain.name, []).append(run)
                log(
                    f"rate {rnd + 1} {chain.name:14} {run['cps']:7.0f} conn/s "
                    f"({errors} errors, {run['cpu_ms_per_conn']:.2f} CPU-ms/conn)"
                )
        self.results["rate"] = res

    # -- idle streams ---------------------------------------------------------------------
    def idle(self) -> None:
        res: dict[str, Any] = {}
        for name, count in self.p["idle"].items():
            if name not in self.b.chains or self.out_of_time("idle"):
                continue
            res[name] = self.idle_one(self.b.chains[name], count)
        self.results["idle"] = res

    def idle_one(self, chain: Chain, count: int) -> dict[str, Any]:
        window = self.p["idle_window"]
        mem0 = {role: procstat.tree_memory([pid]) for role, pid in chain.roles.items()}
        argv = [
            sys.executable,
            "-m",
            "bench.idle",
            "--proxy",
            str(chain.socks_port),
            "--target",
            str(self.b.echo_port),
            "--count",
            str(count),
        ]
        if chain.socks_auth:
            argv += ["--auth", chain.socks_auth]
        if chain.via_port:
            argv += ["--via", str(chain.via_port)]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(self.b.workdir / f"idle-{chain.name}.log").open("w"),
            text=True,
            env=self.b.env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            opened = json.loads(proc.stdout.readline() or "{}")
            n = int(opened.get("opened", 0))
            log(
                f"idle {chain.name}: {n} of {count} streams open in "
                f"{opened.get('seconds', 0):.1f}s ({opened.get('failed')} failed)"
            )
            time.sleep(2.0)
            mem1 = {role: procstat.tree_memory([pid]) for role, pid in chain.roles.items()}
            cpu0 = self.cpu(chain)
            time.sleep(window)
            cpu1 = self.cpu(chain)
            proc.stdin.write("check\n")
            proc.stdin.flush()
            check = json.loads(proc.stdout.readline() or "{}")
            proc.stdin.write("close\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        memory: dict[str, dict[str, Any]] = {}
        for role in mem0:
            memory[role] = {
                "before": mem0[role],
                "after": mem1[role],
                "rss_per_stream": (mem1[role]["rss"] - mem0[role]["rss"]) / max(1, n),
                "pss_per_stream": (mem1[role]["pss"] - mem0[role]["pss"]) / max(1, n),
            }
        cpu = {role: cpu1[role] - cpu0[role] for role in cpu0}
        log(
            f"idle {chain.name}: "
            + ", ".join(
                f"{r} {m['pss_per_stream'] / 1024:.1f} KiB/stream PSS" for r, m in memory.items()
            )
            + f"; CPU over {window:.0f}s: "
            + ", ".join(f"{r} {c:.2f}s" for r, c in cpu.items())
            + f"; alive after idle: {check.get('alive')}/{n}"
        )
        return {
            "requested": count,
            "opened": opened,
            "streams": n,
            "memory": memory,
            "cpu": cpu,
            "window": window,
            "check": check,
        }


def describe_source(rev: Optional[str]) -> Optional[str]:
    """A relay source as recorded in the results: a revision resolved to its commit."""
    if not rev or rev.startswith("dir:"):
        return rev
    commit = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", rev])
    return f"{commit} (git archive of {rev})"


def relay_source(rev: Optional[str], workdir: Path) -> Optional[str]:
    """PYTHONPATH for the relay daemons: the work tree, ``git archive REV`` of relay/, or
    (``dir:PATH``) a directory holding a ``relay`` package, e.g. a patched copy to try a change."""
    if not rev:
        return None
    if rev.startswith("dir:"):
        return str(Path(rev[4:]).resolve())
    target = workdir / "relay-src"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "relay"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


def mode_help(mode: str) -> str:
    """A mode's sizes in words, from MODES, for --help."""
    p = MODES[mode]
    return (
        f"lab: {p['lab_size_mib']} MiB per transfer, {p['lab_rounds']} round(s), "
        f"{p['lab_latency_count']} setup samples per chain and round, connection rate "
        f"{p['lab_rate_parallel']} loops x {p['lab_rate_seconds']:g} s; loopback: "
        f"{p['bulk_size'] >> 20} MiB x {p['bulk_reps']} transfers, {p['lat_count']} setups, "
        f"{p['wan_count']} under the emulated WAN, rate {p['rate_procs']} processes x "
        f"{p['rate_seconds']:g} s x {p['rate_rounds']}, idle streams "
        + ", ".join(f"{k} {v:,}" for k, v in p["idle"].items())
    )


def python_cmd() -> str:
    """The interpreter as a reader would type it from the repository root."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(REPO))
    except ValueError:
        return str(exe)


def setting_command(argv: list[str], setting: str) -> str:
    """The command that measures only ``setting`` the way ``argv`` did (same mode, chains and
    overrides), without writing docs or into the same results directory."""
    keep: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--settings", "--out"):
            skip_next = True
            continue
        if arg.startswith(("--settings=", "--out=")) or arg in ("--update-docs", "--keep-workdir"):
            continue
        keep.append(arg)
    return shlex.join([python_cmd(), "-m", "bench", *keep, "--settings", setting])


def lab_params(params: dict[str, Any]) -> dict[str, Any]:
    """bench.lab_chains' parameters from this mode's ``lab_*`` keys."""
    return {
        "size_mib": params["lab_size_mib"],
        "rounds": params["lab_rounds"],
        "latency_count": params["lab_latency_count"],
        "rate_seconds": params["lab_rate_seconds"],
        "rate_parallel": params["lab_rate_parallel"],
    }


def run_loopback(
    args: argparse.Namespace,
    params: dict[str, Any],
    steps: list[str],
    wanted: list[str],
    results: dict[str, Any],
    workdir: Path,
) -> Optional[str]:
    """The loopback setting (bench.chains) into results; returns why it failed, if it did."""
    bench = Bench(
        workdir,
        relay_source(args.relay_rev, workdir),
        worker_config=params["relay_worker_config"],
        exit_config=params["relay_exit_config"],
    )
    runner = Runner(bench, params, time.monotonic() + args.max_minutes * 60)
    failure: Optional[str] = None
    try:
        bench.start_sink()
        for name in wanted:
            if name == "direct":
                bench.add_direct()
            elif name == "old-chain":
                bench.add_old_chain("old-chain", None, "127.0.0.2")
            elif name == "old-chain-gcm":
                bench.add_old_chain("old-chain-gcm", "aes128-gcm@openssh.com", "127.0.0.3")
            elif name == "relay":
                bench.add_relay()
            elif name == "pproxy":
                bench.add_pproxy()
        for spec in args.variant:
            vname, _, source = spec.partition("=")
            vdir = workdir / f"variant-{vname}"
            vdir.mkdir()
            bench.add_relay(f"relay-{vname}", relay_source(source, vdir))
        if "wan" in steps:
            bench.add_wan()
        results["chains"] = {
            n: {"description": c.description, "roles": list(c.roles)}
            for n, c in bench.chains.items()
        }
        log("loopback chains up: " + ", ".join(bench.chains))
        for step in steps:
            if step == "latency":
                runner.latency(wan=False)
            elif step == "wan":
                runner.latency(wan=True)
            elif step == "bulk":
                runner.bulk()
            elif step == "rate":
                runner.rate()
            elif step == "idle":
                runner.idle()
            results.update(runner.results)
    except BenchFailure as exc:
        failure = str(exc)
    finally:
        bench.close()
        results.update(runner.results)
    return failure


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="the default (make bench-quick, a few minutes): " + mode_help("quick"),
    )
    mode.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="make bench: " + mode_help("full"),
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma list, in the order run: lab (the namespace lab, the primary table) and "
        "loopback (default: lab,loopback)",
    )
    parser.add_argument(
        "--lab-chains",
        default="",
        help="comma list of lab chains: "
        + ", ".join(c for c in lab_chains.ALL_CHAINS)
        + f" (default: all but direct; {lab_chains.TWO_SSH} only when the worker has the "
        "option ssh_connections). The lab always measures the relay of the work tree",
    )
    parser.add_argument(
        "--only",
        default="latency,wan,bulk,rate,idle",
        help="loopback: comma-separated steps (latency, wan, bulk, rate, idle)",
    )
    parser.add_argument(
        "--chains", default=",".join(CHAINS), help="loopback: comma-separated chains"
    )
    parser.add_argument(
        "--relay-rev",
        default=None,
        help="loopback: measure the relay as committed at this git revision (git archive), or"
        " dir:PATH for a directory that holds a relay package, instead of the work tree (the"
        " lab always measures the work tree)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=40.0,
        help="loopback time budget; steps left when it is spent are skipped and listed",
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="put the summary into docs/PERFORMANCE.md (not after a failed run)",
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the work directory (configs, daemon logs of both settings) under /tmp",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="loopback: also measure relay-NAME, the relay from SOURCE (a git revision or "
        "dir:PATH), interleaved with the others, e.g. to try a fast-path change against the "
        "baseline",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a mode parameter, e.g. --set lab_rounds=3 --set bulk_reps=3 "
        "--set 'idle={\"relay\": 1000}' (keys: " + ", ".join(MODES["quick"]) + ")",
    )
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    params = dict(MODES[args.mode])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in params:
            parser.error(f"--set: unknown parameter {key!r} (known: {', '.join(params)})")
        params[key] = json.loads(value)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    wanted = [c.strip() for c in args.chains.split(",") if c.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or any(s not in SETTINGS for s in settings):
        parser.error(f"--settings: choose from {', '.join(SETTINGS)}")
    try:
        lab_names = lab_chains.parse_chains(args.lab_chains, with_direct=False)
    except ValueError as exc:
        parser.error(f"--lab-chains: {exc}")

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if "loopback" in settings and (
        shutil.which("iperf3") is None or not Path("/usr/sbin/danted").exists()
    ):
        print("bench: needs the Debian packages in bench/install-debs", file=sys.stderr)
        return 2
    if "lab" in settings:
        from tests.support.netns import netns_works

        why = netns_works()
        if why:
            print(
                f"bench: the namespace lab cannot run here: {why}; `--settings loopback` "
                "measures the loopback setting only",
                file=sys.stderr,
            )
            return 2
    started = datetime.now(timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + args.mode
    out = args.out or RESULTS / run_id
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="hrbench-"))
    raw_argv = sys.argv[1:] if argv is None else argv
    command = shlex.join([python_cmd(), "-m", "bench", *raw_argv])
    meta = machine(args.relay_rev)
    meta["variants"] = [
        f"{v.partition('=')[0]}={describe_source(v.partition('=')[2])}" for v in args.variant
    ]
    meta.update(
        {
            "run_id": run_id,
            "mode": args.mode,
            "params": params,
            "command": command,
            "setting_commands": {s: setting_command(raw_argv, s) for s in settings},
            "settings": settings,
            "started": started.isoformat(timespec="seconds"),
            "steps": steps if "loopback" in settings else [],
        }
    )
    log(f"{run_id}: {command}; work dir {workdir}")
    results: dict[str, Any] = {"meta": meta}
    failure: Optional[str] = None
    try:
        for setting in settings:
            if setting == "lab":
                log(f"namespace lab: {', '.join(lab_names)}")
                lab = lab_chains.run_lab(
                    lab_names,
                    lab_params(params),
                    meta["setting_commands"]["lab"],
                    args.mode,
                    workdir / "lab",
                )
                if not args.keep_workdir:
                    lab["meta"]["workdir"] += " (removed after the run; --keep-workdir keeps it)"
                results["lab"] = lab
                (out / "lab").mkdir(exist_ok=True)
                (out / "lab" / "summary.md").write_text(
                    lab_chains.summarize(lab["meta"], lab["medians"], lab["meta"]["failure"])
                )
                failure = lab["meta"]["failure"]
            else:
                log("loopback")
                failure = run_loopback(args, params, steps, wanted, results, workdir)
            if failure:
                break
    finally:
        meta["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        meta["failure"] = failure
        (out / "results.json").write_text(json.dumps(results, indent=1))
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    from bench import report

    summary = report.write(results, out)
    log(f"results: {out / 'results.json'}; summary: {summary}")
    if failure:
        log(f"FAILED: {failure}")
        return 1
    if args.update_docs:
        report.update_docs(out)
        log("docs/PERFORMANCE.md updated")
    return 0

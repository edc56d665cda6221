"""Scale rehearsal of a batch site: COBalD/TARDIS starts N glidein jobs under Slurm, each
behind its own relay worker, all through one login node and the idle-killing firewall.

    python -m bench.batch_rehearsal [--drones 16] [--hold 60] [--out DIR]     (as root)

The site is tests/support/batchsite.py with one compute node per drone (glidein.sbatch asks for a
node of its own, --exclusive). Reported: the time from TARDIS's start to every glidein
connected (its collector and shadow connections answered through the relay), and per job from
Slurm's start to connected; the login node's footprint while all are up and idle (TCP
connections to the exit, conntrack entries in the firewall, sshd's processes and memory);
what the relay costs on each compute node (CPU seconds and memory of glidein-wrapper, which
runs the worker, and of its ssh) over the --hold seconds; and the time to drain them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.support.batchsite import BatchSite
from tests.support.netns import _netns_pids

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc(pid: int) -> dict[str, Any] | None:
    """comm, CPU seconds and RSS of one process (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    argv = [a.decode(errors="replace") for a in cmdline if a]
    return {"pid": pid, "comm": comm, "argv": argv, "cpu": cpu, "rss": int(statm[1]) * PAGE}


def _role(info: dict[str, Any]) -> str | None:
    text = " ".join(info["argv"][:3])
    if "glidein-wrapper" in text:
        return "wrapper"
    if info["comm"] == "ssh":
        return "ssh"
    return None


def node_costs(batch: BatchSite) -> dict[str, dict[str, float]]:
    """Per compute node: CPU seconds and RSS of the relay's processes (wrapper, ssh)."""
    out: dict[str, dict[str, float]] = {}
    for ns in batch.site.workers:
        costs = {"wrapper_cpu": 0.0, "wrapper_rss": 0.0, "ssh_cpu": 0.0, "ssh_rss": 0.0}
        for pid in _netns_pids(ns):
            info = _proc(pid)
            role = info and _role(info)
            if info and role:
                costs[f"{role}_cpu"] += info["cpu"]
                costs[f"{role}_rss"] += info["rss"]
        out[ns] = costs
    return out


def login_footprint(batch: BatchSite) -> dict[str, Any]:
    site = batch.site
    login = site.logins[0]
    exit_ip = site.exit_ips[0]
    ss = subprocess.run(
        ["ip", "netns", "exec", login, "ss", "-Htn", "state", "established", "dst", exit_ip],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    sshd = [p for p in map(_proc, _netns_pids(login)) if p and p["comm"] == "sshd"]
    return {
        "tcp_to_exit": len([line for line in ss.splitlines() if line.strip()]),
        "conntrack_to_exit": site.conntrack_count(dport=80),
        "sshd_processes": len(sshd),
        "sshd_rss_mib": round(sum(p["rss"] for p in sshd) / 2**20, 1),
        "sshd_cpu_s": round(sum(p["cpu"] for p in sshd), 2),
    }


def _started(batch: BatchSite, job: int) -> float | None:
    """Slurm's StartTime of the job as a Unix time."""
    assert batch.slurm is not None
    text = batch.slurm.job(job).get("StartTime", "")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").astimezone().timestamp()
    except ValueError:
        return None


def rehearse(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"drones": args.drones, "hold_s": args.hold}
    t0 = time.monotonic()
    with BatchSite.create(nodes=args.drones) as batch:
        result["build_s"] = round(time.monotonic() - t0, 1)
        script = batch.write_sbatch("glidein.sbatch", idle=3600)
        tardis = batch.tardis(script, drones=args.drones)
        start = time.monotonic()
        wall_start = time.time()
        with tardis:
            connected: dict[int, float] = {}
            deadline = start + args.timeout
            while len(connected) < args.drones and time.monotonic() < deadline:
                for drone in tardis.drones():
                    if drone.job_id and int(drone.job_id) not in connected:
                        path = batch.home / "reports" / f"{drone.job_id}.json"
                        if path.exists():
                            connected[int(drone.job_id)] = time.time()
                time.sleep(0.5)
            result["all_connected_s"] = round(time.monotonic() - start, 1)
            result["connected"] = len(connected)
            per_job = []
            for job, when in connected.items():
                began = _started(batch, job)
                if began is not None:
                    per_job.append(when - max(began, wall_start))
            if per_job:
                result["job_start_to_connected_s"] = {
                    "median": round(statistics.median(per_job), 2),
                    "max": round(max(per_job), 2),
                }
            before = node_costs(batch)
            time.sleep(args.hold)
            after = node_costs(batch)
            result["login"] = login_footprint(batch)
            nodes = [ns for ns in after if after[ns]["wrapper_rss"]]
            cpu = [after[n]["wrapper_cpu"] - before[n]["wrapper_cpu"] for n in nodes]
            ssh_cpu = [after[n]["ssh_cpu"] - before[n]["ssh_cpu"] for n in nodes]
            result["per_node_idle"] = {
                "nodes": len(nodes),
                "wrapper_cpu_percent_median": round(100 * statistics.median(cpu) / args.hold, 3)
                if cpu else None,
                "ssh_cpu_percent_median": round(100 * statistics.median(ssh_cpu) / args.hold, 3)
                if ssh_cpu else None,
                "wrapper_rss_mib_median": round(
                    statistics.median(after[n]["wrapper_rss"] for n in nodes) / 2**20, 1
                ) if nodes else None,
                "ssh_rss_mib_median": round(
                    statistics.median(after[n]["ssh_rss"] for n in nodes) / 2**20, 1
                ) if nodes else None,
            }  # fmt: skip
            result["invalid_drops"] = batch.site.invalid_drops()
            drain = time.monotonic()
            tardis.set_drones(0)
            uuids = [d.uuid for d in tardis.drones()]
            tardis.wait_gone(uuids, args.timeout)
            result["drain_s"] = round(time.monotonic() - drain, 1)
        staged = [batch.report(job) for job in connected]
        assert batch.slurm is not None
        result["jobs"] = {
            job: {
                "state": batch.slurm.job(job).get("JobState"),
                "exit_code": batch.slurm.job(job).get("ExitCode"),
                "report": batch.report(job),
            }
            for job in connected
        }
        logs = args.out_dir / "job-logs"
        logs.mkdir(exist_ok=True)
        for path in (batch.home / "logs").glob("glidein-*.log"):
            shutil.copy(path, logs / path.name)
        result["staged_out_ok"] = sum(1 for r in staged if r and r.get("stage_out", {}).get("ok"))
        result["last_update_ok"] = sum(
            1 for r in staged if r and r.get("last") == {"collector": True, "shadow": True}
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drones", type=int, default=16)
    parser.add_argument("--hold", type=float, default=60.0, help="seconds all stay up idle")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("bench/results") / f"{stamp}-batch-rehearsal"
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = out
    meta = {
        "command": " ".join(["python -m bench.batch_rehearsal", *sys.argv[1:]]),
        "started": stamp,
        "cpus": os.cpu_count(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    result = rehearse(args)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    (out / "results.json").write_text(json.dumps({"meta": meta, "result": result}, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "jobs"}, indent=1))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: compute nodes, login nodes and exits under faults on a schedule, every stream verified.

    python -m bench.soak                      # the full run: 30 min, 10,000 streams (as root)
    python -m bench.soak --ci                 # the 3-minute version `make test` runs
    python -m bench.soak --minutes 10 --streams 4000

The lab (tests/support/site.py): N compute-node namespaces with one relay-worker each (all with one
key id, as a site's workers share one), 2 login namespaces with an sshd each (every worker lists
both), the nftables firewall that forgets idle connections, and 2 exits outside: exit A runs
with ``workers = 2`` (a supervisor and two processes), exit B as one process. The destination
(bench.soak_sink) runs outside too; one traffic process (bench.soak_traffic) per compute node
keeps its share of the streams open, each stream checking its bytes end to end.

Faults, each kind every ``--fault-interval`` seconds (staggered):
  carrier-reset      ``ss -K`` of the carriers from one login node to one exit
  carrier-blackhole  the firewall forgets the carriers to one exit (conntrack -D)
  sshd-kill          one login node's sshd and its sessions killed; started again 20 s later
  exit-kill          one process of exit A killed (SIGKILL); its supervisor starts another
  exit-restart       exit B stopped (SIGTERM, as systemctl restart does) and started again
  key-rotation       a key added to (or removed from) both exits' keys files, then SIGHUP
  dest-reset         the flaky destination resets its connections
  dest-vanish        the flaky destination goes silent for 10 s

Every stream ends as "ok" (all bytes verified) or as a reset a fault explains: a stream of the
flaky destination around a dest-reset, or any stream around an exit-kill or exit-restart
(its session may have lived in that process). Carrier faults, sshd kills and key rotations must
cost no stream: resume covers them. Corrupt (wrong, missing or duplicated bytes) and hung
streams fail the run, as does any unexplained reset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from bench import procstat
from tests.support.proc import descendants, terminate
from tests.support.relays import (
    KEY_ID,
    SECRET,
    SOCKS_PASSWORD,
    SOCKS_USER,
    parse_samples,
    write_config,
    write_private,
)
from tests.support.site import Site
from tests.support.sshd import Sshd, start_sshd

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
ECHO_PORT, BULK_PORT, FLAKY_PORT = 7001, 7002, 7003
SOCKS_PORT, WORKER_METRICS, EXIT_METRICS = 1080, 9100, 9200
FAULTS = (
    "exit-kill",
    "exit-restart",
    "carrier-blackhole",
    "key-rotation",
    "dest-reset",
    "dest-vanish",
    "carrier-reset",
    "sshd-kill",
)
"""In schedule order: a black hole comes right after the exit faults, so that most of its
carriers live until the heartbeat finds them (3 heartbeats) instead of being ended first by
another fault."""
SESSION_FAULTS = ("exit-kill", "exit-restart")
"""Faults after which a stream may be reset: its session may have lived in that process."""
EXPLAIN_WINDOW = 90.0
"""Seconds after a session fault in which a reset counts as explained by it (a worker learns
that its session is gone when its next carrier is refused, after reconnect back-off)."""

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "minutes": 30.0,
        # Slots: a stream reset by an exit fault is replaced after a pause, so 10,500 slots
        # keep at least 10,000 streams open at once.
        "streams": 10500,
        "workers": 8,
        # Every kind at least once a minute: 32 of each in 30 minutes.
        "fault_interval": 55.0,
        "idle_interval": 120.0,
        "heartbeat": 25.0,
        "bulk_size": 8 << 20,
        "rr_pause": 5.0,
        "bulk_pause": 20.0,
        "mix": "idle=0.95,rr=0.03,bulk=0.005,flaky=0.015",
    },
    "ci": {
        "minutes": 3.0,
        "streams": 800,
        "workers": 4,
        "fault_interval": 20.0,
        "idle_interval": 10.0,
        "heartbeat": 5.0,
        "bulk_size": 1 << 20,
        "rr_pause": 1.0,
        "bulk_pause": 2.0,
        "mix": "idle=0.9,rr=0.08,bulk=0.01,flaky=0.01",
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Proc:
    name: str
    ns: str
    argv: list[str]
    log: Path
    popen: Optional[subprocess.Popen[Any]] = None

    def pids(self) -> list[int]:
        if self.popen is None or self.popen.poll() is not None:
            return []
        return [self.popen.pid, *descendants(self.popen.pid)]


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    site: Optional[Site] = None
    sshds: list[Sshd] = field(default_factory=list)
    exits: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    clients: list[Proc] = field(default_factory=list)
    sink: Optional[Proc] = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _rotation: int = 0

    # ---------------------------------------------------------------------------- set-up
    def spawn(self, proc: Proc) -> Proc:
        assert self.site is not None
        proc.popen = self.site.spawn(
            proc.ns,
            proc.argv,
            stdout=proc.log.open("a"),
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        return proc

    def start(self) -> None:
        a = self.args
        self.site = site = Site.create(
            self.workdir / "site",
            workers=a.workers,
            logins=2,
            exits=2,
            idle_timeout=a.fw_idle_timeout,
        )
        first: Optional[Sshd] = None
        for j, ns in enumerate(site.logins):
            sshd = start_sshd(
                self.workdir / f"sshd{j}",
                host=site.login_ips[j],
                port=22,
                netns=ns,
                client_key=first.client_key if first else None,
            )
            first = first or sshd
            self.sshds.append(sshd)
        known = self.workdir / "known_hosts"
        known.write_text("".join(s.known_hosts.read_text() for s in self.sshds))
        self.sink = self.spawn(
            Proc(
                "sink",
                site.outside,
                [
                    sys.executable,
                    "-m",
                    "bench.soak_sink",
                    "--host",
                    site.sink_ip,
                    "--echo-port",
                    str(ECHO_PORT),
                    "--bulk-port",
                    str(BULK_PORT),
                    "--flaky-port",
                    str(FLAKY_PORT),
                    "--status-file",
                    str(self.workdir / "sink.json"),
                ],
                self.workdir / "sink.log",
            )
        )
        site.wait_listening(site.outside, FLAKY_PORT, proc=self.sink.popen)
        self.keys = write_private(self.workdir / "exit.keys", f"{KEY_ID} {SECRET}\n")
        for i, ip in enumerate(site.exit_ips[:2]):
            values: dict[str, Any] = {
                "listen": f"{ip}:80",
                "keys": str(self.keys),
                "allow": [f"{site.sink_ip}/32:{ECHO_PORT}-{FLAKY_PORT}"],
                "metrics": f"{ip}:{EXIT_METRICS}",
                "heartbeat": a.heartbeat,
                "max_streams": 50000,
                "max_streams_per_key": 50000,
            }
            if i == 0:
                values["workers"] = 2
            config = write_config(self.workdir / f"exit{i}.toml", "exit", values)
            proc = self.spawn(
                Proc(
                    f"exit-{'AB'[i]}",
                    site.outside,
                    [str(BIN / "relay-exit"), "--config", str(config)],
                    self.workdir / f"exit{i}.log",
                )
            )
            site.wait_listening(site.outside, 80, proc=proc.popen)
            self.exits.append(proc)
        secret = write_private(self.workdir / "worker.secret", SECRET + "\n")
        auth = write_private(self.workdir / "socks.auth", f"{SOCKS_USER}:{SOCKS_PASSWORD}\n")
        for i, ns in enumerate(site.workers):
            values = {
                "socks": f"127.0.0.1:{SOCKS_PORT}",
                "socks_auth": str(auth),
                "login": [f"{self.sshds[0].user}@{ip}:22" for ip in site.login_ips],
                "ssh_key": str(self.sshds[0].client_key),
                "known_hosts": str(known),
                "ssh_config": "/dev/null",
                "exit": [f"{ip}:80" for ip in site.exit_ips[:2]],
                "key_id": KEY_ID,
                "secret_file": str(secret),
                "heartbeat": a.heartbeat,
                "metrics": f"127.0.0.1:{WORKER_METRICS}",
            }
            config = write_config(self.workdir / f"worker{i}.toml", "worker", values)
            proc = self.spawn(
                Proc(
                    f"worker-{i}",
                    ns,
                    [str(BIN / "relay-worker"), "--config", str(config)],
                    self.workdir / f"worker{i}.log",
                )
            )
            self.workers.append(proc)
        for proc in self.workers:
            site.wait_listening(proc.ns, SOCKS_PORT, proc=proc.popen)
        log(f"site up: {a.workers} workers, 2 login nodes, 2 exits (A with 2 processes)")

    def start_traffic(self) -> None:
        a = self.args
        site = self.site
        assert site is not None
        share = a.streams // a.workers
        for i, ns in enumerate(site.workers):
            out = self.workdir / f"traffic{i}.jsonl"
            self.clients.append(
                self.spawn(
                    Proc(
                        f"traffic-{i}",
                        ns,
                        [
                            sys.executable,
                            "-m",
                            "bench.soak_traffic",
                            "--socks",
                            f"127.0.0.1:{SOCKS_PORT}",
                            "--auth",
                            f"{SOCKS_USER}:{SOCKS_PASSWORD}",
                            "--sink-host",
                            site.sink_ip,
                            "--echo-port",
                            str(ECHO_PORT),
                            "--bulk-port",
                            str(BULK_PORT),
                            "--flaky-port",
                            str(FLAKY_PORT),
                            "--streams",
                            str(share),
                            "--duration",
                            str(a.minutes * 60),
                            "--idle-interval",
                            str(a.idle_interval),
                            "--bulk-size",
                            str(a.bulk_size),
                            "--hang-after",
                            str(a.hang_after),
                            "--mix",
                            a.mix,
                            "--rr-pause",
                            str(a.rr_pause),
                            "--bulk-pause",
                            str(a.bulk_pause),
                            "--seed",
                            str(1000 + i),
                            "--out",
                            str(out),
                        ],
                        self.workdir / f"traffic{i}.log",
                    )
                )
            )

    # ---------------------------------------------------------------------------- faults
    def fault(self, kind: str, n: int) -> dict[str, Any]:
        site = self.site
        assert site is not None and self.sink is not None and self.sink.popen is not None
        record: dict[str, Any] = {"kind": kind, "at": time.time(), "n": n}
        if kind == "carrier-reset":
            login = n % len(site.logins)
            exit_ip = site.exit_ips[n % 2]
            record["killed"] = site.kill_sockets(site.logins[login], f"dst {exit_ip} dport = :80")
            record["where"] = f"login {login} -> {exit_ip}"
        elif kind == "carrier-blackhole":
            exit_ip = site.exit_ips[n % 2]
            res = site.run(
                site.fw,
                ["conntrack", "-D", "-p", "tcp", "--dport", "80", "-d", exit_ip],
                check=False,
            )
            record["where"] = exit_ip
            record["detail"] = (res.stdout + res.stderr).strip()[-200:]
        elif kind == "sshd-kill":
            j = n % len(self.sshds)
            self.sshds[j].stop(kill_sessions=True)
            record["where"] = f"login {j}"
            threading.Timer(20.0, self._restart_sshd, (j,)).start()
        elif kind == "exit-kill":
            a = self.exits[0]
            children = [p for p in a.pids()[1:] if "relay.cli exit" in _cmdline(p)]
            if children:
                victim = random.Random(n).choice(children)
                os.kill(victim, signal.SIGKILL)
                record["where"] = f"exit A process {victim}"
        elif kind == "exit-restart":
            b = self.exits[1]
            assert b.popen is not None
            terminate(popens=[b.popen])
            self.spawn(b)
            site.wait_listening(site.outside, 80, proc=b.popen)
            record["where"] = "exit B"
        elif kind == "key-rotation":
            self._rotation += 1
            text = f"{KEY_ID} {SECRET}\n"
            if self._rotation % 2:
                text += f"rotated-{self._rotation} {os.urandom(16).hex()}\n"
            self.keys.write_text(text)
            for proc in self.exits:
                if proc.popen is not None:
                    os.kill(proc.popen.pid, signal.SIGHUP)
            record["where"] = "added a key" if self._rotation % 2 else "removed a key"
        elif kind == "dest-reset":
            os.kill(self.sink.popen.pid, signal.SIGUSR1)
        elif kind == "dest-vanish":
            os.kill(self.sink.popen.pid, signal.SIGUSR2)
            threading.Timer(10.0, lambda: os.kill(self.sink.popen.pid, signal.SIGUSR2)).start()  # type: ignore[union-attr]
        return record

    def _restart_sshd(self, j: int) -> None:
        if not self._stop.is_set():
            self.sshds[j].restart(kill_sessions=False)

    def run_faults(self) -> None:
        interval = self.args.fault_interval
        step = interval / len(FAULTS)
        start = time.monotonic() + step
        counts = dict.fromkeys(FAULTS, 0)
        deadline = time.monotonic() + self.args.minutes * 60 - interval / 2
        k = 0
        while not self._stop.is_set():
            due = start + k * step
            if due > deadline:
                return
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            kind = FAULTS[k % len(FAULTS)]
            try:
                record = self.fault(kind, counts[kind])
            except Exception as exc:  # a fault that cannot be made is reported, not hidden
                record = {"kind": kind, "at": time.time(), "error": repr(exc)}
            counts[kind] += 1
            self.faults.append(record)
            log(f"fault {kind} #{counts[kind]}: {record.get('where', '')}")
            k += 1

    # ---------------------------------------------------------------------------- sampling
    def sample(self) -> None:
        site = self.site
        assert site is not None
        row: dict[str, Any] = {"t": time.time(), "procs": {}}
        groups = {p.name: p.pids() for p in [*self.exits, *self.workers]}
        for j, sshd in enumerate(self.sshds):
            groups[f"sshd-{j}"] = [sshd.pid, *descendants(sshd.pid)] if sshd.running else []
        for name, pids in groups.items():
            rss = fds = 0
            cpu = 0.0
            for pid in pids:
                try:
                    rss += procstat.memory([pid])["rss"]
                    fds += len(os.listdir(f"/proc/{pid}/fd"))
                    cpu += procstat.cpu_seconds([pid])
                except (OSError, KeyError):
                    continue
            row["procs"][name] = {"rss": rss, "fds": fds, "cpu": cpu, "n": len(pids)}
        metrics: dict[str, float] = {}
        for ns in site.workers:
            res = site.run(
                ns,
                ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{WORKER_METRICS}/metrics"],
                check=False,
            )
            for name, value in parse_samples(res.stdout).items():
                if name.startswith(
                    (
                        "relay_streams_total",
                        "relay_carriers_total",
                        "relay_resumes_total",
                        "relay_streams_active",
                        "relay_ssh_connects_total",
                    )
                ):
                    metrics[name] = metrics.get(name, 0.0) + value
        row["worker_metrics"] = metrics
        self.samples.append(row)

    def sample_loop(self) -> None:
        while not self._stop.wait(self.args.sample_interval):
            try:
                self.sample()
            except Exception as exc:
                log(f"sample failed: {exc!r}")

    # ---------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        self.start()
        self.sample()
        self.start_traffic()
        threads = [
            threading.Thread(target=self.run_faults, daemon=True),
            threading.Thread(target=self.sample_loop, daemon=True),
        ]
        for t in threads:
            t.start()
        limit = self.args.minutes * 60 + self.args.hang_after + 120
        for client in self.clients:
            assert client.popen is not None
            try:
                client.popen.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                log(f"{client.name} did not finish: stopping it")
                client.popen.terminate()
                client.popen.wait(30)
        self._stop.set()
        self.sample()
        return self.account()

    def close(self) -> None:
        self._stop.set()
        popens = [
            p.popen for p in [*self.clients, *self.workers, *self.exits] if p.popen is not None
        ]
        if self.sink is not None and self.sink.popen is not None:
            popens.append(self.sink.popen)
        terminate(popens=popens)
        for sshd in self.sshds:
            sshd.stop()
        if self.site is not None:
            self.site.close()

    # ---------------------------------------------------------------------------- accounting
    def account(self) -> dict[str, Any]:
        streams: list[dict[str, Any]] = []
        summaries: list[dict[str, Any]] = []
        for i in range(len(self.clients)):
            path = self.workdir / f"traffic{i}.jsonl"
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                item = json.loads(line)
                (summaries if item.get("summary") else streams).append(item)
        session_faults = [f["at"] for f in self.faults if f["kind"] in SESSION_FAULTS]
        dest_faults = [f["at"] for f in self.faults if f["kind"] == "dest-reset"]
        outcomes: dict[str, int] = {}
        explained: dict[str, int] = {}
        unexplained: list[dict[str, Any]] = []
        for s in streams:
            outcome = s["outcome"]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome in ("ok", "corrupt", "hung"):
                continue
            why = _explain(s, session_faults, dest_faults)
            if why:
                explained[why] = explained.get(why, 0) + 1
            else:
                unexplained.append(s)
        clients_exit = {c.name: c.popen.returncode if c.popen else None for c in self.clients}
        return {
            "streams": len(streams),
            "outcomes": outcomes,
            "explained": explained,
            "unexplained": unexplained[:50],
            "unexplained_count": len(unexplained),
            "faults": self.faults,
            "fault_counts": {
                k: sum(1 for f in self.faults if f["kind"] == k and "error" not in f)
                for k in FAULTS
            },
            "fault_errors": [f for f in self.faults if "error" in f],
            "samples": self.samples,
            "client_summaries": summaries,
            "clients_exit": clients_exit,
            "peak_active": max(
                (s.get("active", 0) for s in _status_lines(self.workdir)), default=0
            ),
            "recovery": recovery(self.workdir, self.faults),
        }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _status_lines(workdir: Path) -> list[dict[str, Any]]:
    """The traffic clients' periodic status lines, summed per 10 s slot: concurrent streams."""
    slots: dict[int, int] = {}
    for path in workdir.glob("traffic*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("status") and "time" in item:
                slot = int(item["time"] // 10)
                slots[slot] = slots.get(slot, 0) + int(item["active"])
    return [{"slot": k, "active": v} for k, v in sorted(slots.items())]


_LOST = re.compile(r"^(\S+) .*carrier lost exit=(\S+) .*why=(.*)$")
_RESUMED = re.compile(r"^(\S+) .*session resumed exit=(\S+) gap=([0-9.]+) streams=(\d+)")
_OPENED = re.compile(r"^(\S+) .*session open exit=(\S+)")
_SILENT = re.compile(r"no frame for ([0-9.]+)s")


def recovery(workdir: Path, faults: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How long streams waited, from the workers' logs (one-second time stamps).

    Resumes are grouped by why the carrier was lost: a heartbeat timeout (a black hole: the
    wait is the silence until the worker declared the carrier dead plus the resume gap) or
    a closed carrier (reset, sshd or ssh gone: the resume gap). For exit faults: how long
    after the fault the workers had new sessions."""
    stamps = sorted((f["at"], f["kind"]) for f in faults if "error" not in f)
    holes = sorted(
        (f["at"], f"{f['where']}:80")
        for f in faults
        if f["kind"] == "carrier-blackhole" and "error" not in f and f.get("where")
    )
    waits: dict[str, list[float]] = {}
    for path in sorted(workdir.glob("worker*.log")):
        lost: dict[str, float] = {}  # exit -> silence before the loss (0: closed)
        pending = list(holes)  # black holes whose first carrier loss in this worker is due
        for line in path.read_text(errors="replace").splitlines():
            m = _LOST.match(line)
            if m:
                silent = _SILENT.search(m.group(3))
                lost[m.group(2)] = float(silent.group(1)) if silent else 0.0
                at = _iso(m.group(1))
                for hole in [h for h in pending if h[1] == m.group(2) and h[0] <= at + 1]:
                    pending.remove(hole)
                    if at - hole[0] <= EXPLAIN_WINDOW:
                        key = "black hole -> its carriers lost (heartbeat or a later fault)"
                        waits.setdefault(key, []).append(max(0.0, at - hole[0]))
                continue
            m = _RESUMED.match(line)
            if m and int(m.group(4)) > 0:
                silence = lost.pop(m.group(2), 0.0)
                key = "carrier black-holed (heartbeat timeout)" if silence else "carrier closed"
                waits.setdefault(key, []).append(silence + float(m.group(3)))
                continue
            m = _OPENED.match(line)
            if m:
                at = _iso(m.group(1))
                before = [(t, k) for t, k in stamps if k in SESSION_FAULTS and t <= at + 1]
                if before and at - before[-1][0] <= EXPLAIN_WINDOW:
                    key = f"new session after {before[-1][1]}"
                    waits.setdefault(key, []).append(max(0.0, at - before[-1][0]))
    return {key: _spread(values) for key, values in sorted(waits.items())}


def _iso(stamp: str) -> float:
    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()


def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}  # fmt: skip


def _explain(stream: dict[str, Any], session_faults: list[float], dest: list[float]) -> str:
    ended = float(stream.get("ended", 0.0))
    if stream.get("kind") == "flaky" and any(t - 1 <= ended <= t + 30 for t in dest):
        return "dest-reset"
    if any(t - 1 <= ended <= t + EXPLAIN_WINDOW for t in session_faults):
        return "session lost with an exit process"
    return ""


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per minute) of (seconds, value) points."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] / 60 for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def verdict(result: dict[str, Any], profile: dict[str, Any]) -> list[str]:
    """What failed; empty when the run passed."""
    problems = []
    outcomes = result["outcomes"]
    for bad in ("corrupt", "hung"):
        if outcomes.get(bad):
            problems.append(f"{outcomes[bad]} {bad} streams")
    if result["unexplained_count"]:
        problems.append(f"{result['unexplained_count']} resets no fault explains")
    if not outcomes.get("ok"):
        problems.append("no stream completed")
    missing = [k for k, n in result["fault_counts"].items() if n == 0]
    if missing:
        problems.append(f"faults never made: {', '.join(missing)}")
    if result["fault_errors"]:
        problems.append(f"{len(result['fault_errors'])} faults failed to run")
    bad_exit = {k: v for k, v in result["clients_exit"].items() if v not in (0,)}
    if bad_exit:
        problems.append(f"traffic clients exited non-zero: {bad_exit}")
    return problems


def summarize(result: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Soak run",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Date (UTC): {meta['started']}; host {meta['host']}: {meta['cpus']} CPUs, load"
        f" {meta['load_before']} before, {meta['load_after']} after; relay {meta['commit']};"
        f" {meta['seconds']:.0f} s in all.",
        "",
        f"Profile: {json.dumps(meta['profile'])}",
        "",
        "**Verdict: "
        + ("PASS" if not meta["problems"] else "FAIL: " + "; ".join(meta["problems"]))
        + "**",
        "",
        "## Streams",
        "",
        "| outcome | streams |",
        "|---|---|",
    ]
    for outcome, n in sorted(result["outcomes"].items()):
        lines.append(f"| {outcome} | {n} |")
    lines += [
        "",
        f"Streams in all: {result['streams']}; most at once (sum of the clients'"
        f" 10 s status lines): {result['peak_active']}.",
        "",
    ]
    if result["explained"]:
        lines += ["Resets and failed opens, by the fault that explains them:", ""]
        lines += [f"- {why}: {n}" for why, n in sorted(result["explained"].items())]
        lines.append("")
    lines += ["## Faults", "", "| fault | times |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in result["fault_counts"].items()]
    if result.get("recovery"):
        lines += ["", "## Recovery", "",
                  "How long the affected streams waited, from the workers' logs (1 s time"
                  " stamps): a black-holed carrier, from its last frame to its streams moving"
                  " on another carrier; a closed carrier, the resume gap; after an exit fault,"
                  " the time until each worker had a new session.", "",
                  "| event | times | median s | max s |", "|---|---|---|---|"]  # fmt: skip
        for key, spread in result["recovery"].items():
            lines.append(
                f"| {key} | {spread['n']} | {spread['median']:.2f} | {spread['max']:.2f} |"
            )
    samples = result["samples"]
    if len(samples) >= 2:
        t0 = samples[0]["t"]
        warm = [s for s in samples if s["t"] - t0 >= meta["profile"]["warmup"]]
        lines += [
            "",
            "## Resources",
            "",
            f"Sampled every {meta['profile']['sample_interval']:g} s; slope over the"
            f" samples after the first {meta['profile']['warmup']:g} s.",
            "",
            "| process | RSS first / last MiB | RSS slope MiB/min | fds first / last |"
            " fd slope /min | CPU s |",
            "|---|---|---|---|---|---|",
        ]
        for name in samples[-1]["procs"]:
            pts = [(s["t"] - t0, s["procs"].get(name, {}).get("rss", 0) / 2**20) for s in warm]
            fds = [(s["t"] - t0, s["procs"].get(name, {}).get("fds", 0)) for s in warm]
            first, last = samples[0]["procs"].get(name, {}), samples[-1]["procs"][name]
            lines.append(
                f"| {name} | {first.get('rss', 0) / 2**20:.0f} / {last['rss'] / 2**20:.0f} |"
                f" {_slope(pts):+.2f} | {first.get('fds', 0)} / {last['fds']} |"
                f" {_slope(fds):+.1f} | {last['cpu']:.0f} |"
            )
        m = samples[-1].get("worker_metrics", {})
        picked = {k: v for k, v in sorted(m.items()) if v}
        lines += ["", "Workers' counters at the end (summed over workers):", ""]
        lines += [f"- `{k}` {v:g}" for k, v in picked.items()]
    if result["unexplained"]:
        lines += ["", "## Unexplained (first 50)", ""]
        lines += [f"- `{json.dumps(s)}`" for s in result["unexplained"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """PNG plots of RSS and fds per daemon over time (needs matplotlib: `.[bench]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    samples = result["samples"]
    if len(samples) < 2:
        return []
    t0 = samples[0]["t"]
    written = []
    for key, label, scale in (("rss", "RSS (MiB)", 2**20), ("fds", "open descriptors", 1)):
        fig, ax = plt.subplots(figsize=(8, 4))
        for name in samples[-1]["procs"]:
            xs = [(s["t"] - t0) / 60 for s in samples]
            ys = [s["procs"].get(name, {}).get(key, 0) / scale for s in samples]
            ax.plot(xs, ys, label=name)
        ax.set_xlabel("minutes")
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small", ncol=3)
        fig.tight_layout()
        path = out / f"soak-{key}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ci", action="store_true", help="the 3-minute profile")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--streams", type=int, help="concurrent streams over all workers")
    parser.add_argument("--workers", type=int, help="compute nodes (one relay-worker each)")
    parser.add_argument("--fault-interval", type=float, help="seconds between faults of a kind")
    parser.add_argument("--idle-interval", type=float, help="seconds between idle streams' echoes")
    parser.add_argument("--heartbeat", type=float, help="worker and exit heartbeat (s)")
    parser.add_argument("--bulk-size", type=int, help="bytes per bulk transfer")
    parser.add_argument("--mix", help="share of stream kinds, e.g. idle=0.95,rr=0.03,...")
    parser.add_argument("--rr-pause", type=float, help="seconds between request/response streams")
    parser.add_argument("--bulk-pause", type=float, help="seconds between bulk transfers")
    parser.add_argument(
        "--hang-after",
        type=float,
        default=0.0,
        help="seconds without expected progress that make a stream hung"
        " (default: 4 heartbeats + 60)",
    )
    parser.add_argument("--fw-idle-timeout", type=int, default=40)
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.0,
        help="seconds between resource samples (default 60, ci 15)",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    name = "ci" if args.ci else "full"
    for key, value in PROFILES[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.hang_after = args.hang_after or 4 * args.heartbeat + 60
    args.sample_interval = args.sample_interval or (15.0 if args.ci else 60.0)
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd, nftables)", file=sys.stderr)
        return 2
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = datetime.now(timezone.utc)
    out = (
        Path(args.out)
        if args.out
        else RESULTS / (started.strftime("%Y%m%dT%H%M%SZ") + f"-soak-{name}")
    )
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    profile = {k: getattr(args, k) for k in PROFILES["full"]}
    profile.update(
        hang_after=args.hang_after,
        sample_interval=args.sample_interval,
        warmup=min(300.0, args.minutes * 60 / 3),
        fw_idle_timeout=args.fw_idle_timeout,
    )
    meta: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "-m", "bench.soak", *(argv or sys.argv[1:])])
        + "  # as root",
        "started": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "profile": profile,
        "workdir": str(workdir),
    }
    soak = Soak(args, workdir)
    t0 = time.monotonic()
    result: dict[str, Any] = {}
    try:
        result = soak.run()
    finally:
        soak.close()
    meta["seconds"] = time.monotonic() - t0
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["problems"] = verdict(result, profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "result": result}, indent=1))
    text = summarize(result, meta)
    plots = plot(result, out)
    if plots:
        text += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    log(f"results in {out}; work directory {workdir}")
    return 1 if meta["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Protocol v2 next to protocol v1 in the namespace lab (real sshd, forwarding nftables firewall).

    python -m bench.mux_lab [--quick] [--v1-root /work/v1-39076cc]   # as root

One lab (tests/support/netns.py: worker, login, fw, outside namespaces) holds both relays at once:

    v2: relay-worker (socks 1080) -> sshd 192.0.2.1:22   -> relay-exit 203.0.113.2:80
    v1: relay-worker (socks 1081) -> sshd 192.0.2.1:2222 -> relay-exit 203.0.113.2:443

v2 is the working tree this file lives in (console scripts of its venv); v1 is a worktree at
the last v1 commit with its own venv (``--v1-root``). Each version has its own sshd so the
login node's processes, memory and CPU can be told apart. The destination (bench.sink: bulk
source/sink and echo server) runs in the outside namespace, next to the exits. Both relays
run with their shipped defaults (heartbeat 25 s, 2 carriers / 2 warm carriers, info logs)
except for raised stream limits on the exits, so neither is capped before the other.

The idle experiment runs first on fresh daemons; then every sshd, exit and worker is restarted
so the others do not inherit its grown heaps and sshd channel tables. The outside namespace has
``net.ipv4.tcp_tw_reuse=1`` (see Bench.start) because every stream goes to the same sink port.

Experiments (v2 and v1 alternate within each repeat):
  idle      N streams opened and echoed once, then: login->exit TCP connections, firewall
            conntrack entries, PSS growth per stream (sshd tree, worker, exit), idle CPU of
            worker + exit + sshd over a window; then every stream echoes once more.
  rate      P parallel loops of connect + 1-byte echo + close for T seconds.
  fairness  1-byte echo round trips on one stream, idle and while another stream of the
            same worker downloads at full speed.
  bulk      200 MiB down and up, SHA-256 checked, CPU per GiB by process.

Results: bench/results/<UTC date>-mux-lab/results.json (raw) and summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
from tests.support.netns import Lab
from tests.support.proc import terminate
from tests.support.relays import (
    KEY_ID,
    SECRET,
    SOCKS_PASSWORD,
    SOCKS_USER,
    parse_samples,
    write_config,
    write_private,
)
from tests.support.sshd import Sshd, start_sshd

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NOFILE = 1 << 17
BULK_PORT, ECHO_PORT = 8001, 8002
EXPERIMENTS = ("idle", "rate", "fairness", "bulk")
QUEUE_HOPS = (
    "exit_sendq",
    "sshd_from_exit_recvq",
    "sshd_to_worker_sendq",
    "worker_from_sshd_recvq",
)

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "streams": {"v2": 1000, "v1": 1000},
        "idle_window": 20.0,
        "rate_seconds": 5.0,
        "rate_parallel": 8,
        "repeats": 1,
        "probe_count": 200,
        "probe_interval": 0.01,
        "probe_max_seconds": 5.0,
        "bulk_size": 200 << 20,
    },
    "full": {
        # v1 needs two descriptors per stream at the exit (carrier + destination): fewer v1
        # streams when the descriptor limit cannot be raised past 21000 (see main()).
        "streams": {"v2": 10000, "v1": 10000},
        "idle_window": 60.0,
        "rate_seconds": 10.0,
        "rate_parallel": 8,
        "repeats": 5,
        "probe_count": 400,
        "probe_interval": 0.01,
        "probe_max_seconds": 8.0,
        "bulk_size": 200 << 20,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Relay:
    """One version's chain: its sshd, exit, worker and where to reach them."""

    name: str
    root: Path
    sshd: Sshd
    exit_port: int
    socks_port: int
    exit_metrics: int
    worker_metrics: int
    exit_proc: Optional[subprocess.Popen[Any]] = None
    worker_proc: Optional[subprocess.Popen[Any]] = None
    configs: dict[str, str] = field(default_factory=dict)
    commit: str = ""
    dirty: list[str] = field(default_factory=list)

    @property
    def bin(self) -> Path:
        return self.root / ".venv" / "bin"

    def pids(self) -> dict[str, list[int]]:
        """Process trees by role (sshd: listener + per-connection processes)."""
        assert self.exit_proc is not None and self.worker_proc is not None
        return {
            "worker": procstat.tree([self.worker_proc.pid]),
            "exit": procstat.tree([self.exit_proc.pid]),
            "sshd": procstat.tree([self.sshd.pid]),
        }

    def cpu(self) -> dict[str, float]:
        return {role: procstat.cpu_seconds(p) for role, p in self.pids().items()}

    def pss(self) -> dict[str, int]:
        return {role: procstat.memory(p)["pss"] for role, p in self.pids().items()}


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.mode = dict(MODES["quick" if args.quick else "full"])
        if getattr(args, "repeats", 0):
            self.mode["repeats"] = args.repeats
        self.workdir = workdir
        self.lab: Optional[Lab] = None
        self.relays: dict[str, Relay] = {}
        self.sshds: list[Sshd] = []

    # ------------------------------------------------------------------------- set-up

    def start(self) -> None:
        # The firewall forgets connections idle longer than this; the idle window of the full
        # mode is longer, so its final echo check also shows the heartbeats keep carriers alive.
        self.lab = Lab.create(self.workdir / "lab", idle_timeout=self.args.fw_idle_timeout)
        lab = self.lab
        # The exit host dials the one sink port over and over; Linux keeps each closed
        # connection in TIME_WAIT for 60 s and connect() then spends its time (system CPU in
        # the exit) searching the ephemeral ports for a free 4-tuple. Measured without this:
        # v1's 9000 streams opened in 49 s after v2's 10000 had closed (exit 29 s system vs
        # 7 s user CPU) against 13.5 s on a clean namespace. Real exits dial many destinations,
        # so reuse is allowed there; the login node keeps the kernel default.
        lab.run(lab.outside, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        v2_sshd = start_sshd(
            self.workdir / "sshd-v2", host=lab.login_ip, port=22, netns=lab.login,
            extra_config={"LogLevel": "INFO"},
        )  # fmt: skip
        self.sshds.append(v2_sshd)
        v1_sshd = start_sshd(
            self.workdir / "sshd-v1", host=lab.login_ip, port=2222, netns=lab.login,
            extra_config={"LogLevel": "INFO"}, client_key=v2_sshd.client_key,
        )  # fmt: skip
        self.sshds.append(v1_sshd)
        sink = lab.spawn(
            lab.outside,
            [sys.executable, "-m", "bench.sink", "--host", lab.outside_ip,
             "--bulk-port", str(BULK_PORT), "--echo-port", str(ECHO_PORT)],
            cwd=str(REPO),
        )  # fmt: skip
        lab.wait_listening(lab.outside, BULK_PORT, proc=sink)
        lab.wait_listening(lab.outside, ECHO_PORT, proc=sink)
        self.relays["v2"] = Relay("v2", REPO, v2_sshd, 80, 1080, 9100, 9200)
        self.relays["v1"] = Relay("v1", Path(self.args.v1_root), v1_sshd, 443, 1081, 9101, 9201)
        for relay in self.relays.values():
            self._start_relay(relay)

    def _start_relay(self, relay: Relay) -> None:
        lab = self.lab
        assert lab is not None
        wd = self.workdir / relay.name
        wd.mkdir(parents=True, exist_ok=True)
        relay.commit = subprocess.run(
            ["git", "-C", str(relay.root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(relay.root), "status", "--porcelain", "--", "relay"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        if dirty:
            relay.commit += "+dirty"
            relay.dirty = [line.split(maxsplit=1)[-1] for line in dirty.splitlines()]
        keys = write_private(wd / "exit.keys", f"{KEY_ID} {SECRET}\n")
        exit_values: dict[str, Any] = {
            "listen": f"{lab.outside_ip}:{relay.exit_port}",
            "keys": str(keys),
            "allow": ["203.0.113.0/24:*"],
            "metrics": f"{lab.outside_ip}:{relay.exit_metrics}",
            "max_streams": 50000,
            "max_streams_per_key": 50000,
        }
        exit_values.update(self.args.settings.get((relay.name, "exit"), {}))
        exit_cfg = write_config(wd / "exit.toml", "exit", exit_values)
        relay.exit_proc = lab.spawn(
            lab.outside, [str(relay.bin / "relay-exit"), "--config", str(exit_cfg)],
            stdout=(wd / "exit.log").open("a"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        lab.wait_listening(lab.outside, relay.exit_port, timeout=15, proc=relay.exit_proc)
        secret = write_private(wd / "worker.secret", SECRET + "\n")
        auth = write_private(wd / "socks.auth", f"{SOCKS_USER}:{SOCKS_PASSWORD}\n")
        sshd = relay.sshd
        worker_values: dict[str, Any] = {
            "socks": f"127.0.0.1:{relay.socks_port}",
            "socks_auth": str(auth),
            "login": [f"{sshd.user}@{sshd.host}:{sshd.port}"],
            "ssh_key": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts),
            "exit": [f"{lab.outside_ip}:{relay.exit_port}"],
            "key_id": KEY_ID,
            "secret_file": str(secret),
            "metrics": f"127.0.0.1:{relay.worker_metrics}",
        }
        if relay.name == "v1" and self.args.v1_warm_carriers is not None:
            worker_values["warm_carriers"] = self.args.v1_warm_carriers
        worker_values.update(self.args.settings.get((relay.name, "worker"), {}))
        worker_cfg = write_config(wd / "worker.toml", "worker", worker_values)
        relay.worker_proc = lab.spawn(
            lab.worker, [str(relay.bin / "relay-worker"), "--config", str(worker_cfg)],
            stdout=(wd / "worker.log").open("a"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        lab.wait_listening(lab.worker, relay.socks_port, timeout=15, proc=relay.worker_proc)
        relay.configs = {"exit": exit_cfg.read_text(), "worker": worker_cfg.read_text()}
        # The worker logs in and opens its carriers in the background; one stream end to end
        # proves the chain is up before anything is measured.
        deadline = time.monotonic() + 30
        while True:
            res = self._client(relay, "rate", "--seconds", "0.2", "--parallel", "1")
            if res.get("ok"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{relay.name} chain not working: {res}")
            time.sleep(0.5)
        log(f"{relay.name} ({relay.commit}) up")

    def restart(self) -> None:
        """Fresh sshd, exit and worker for each version.

        After the idle experiment sshd's session keeps a channel table sized for thousands of
        channels (OpenSSH never shrinks it and walks it on every loop), and the daemons' heaps
        are grown; the later experiments should not inherit that."""
        for relay in self.relays.values():
            popens = [p for p in (relay.worker_proc, relay.exit_proc) if p is not None]
            terminate(popens=popens)
            relay.sshd.restart(kill_sessions=True)
        for relay in self.relays.values():
            self._start_relay(relay)

    def close(self) -> None:
        # Workers first: ended after sshd they would log a lost SSH connection and a retry.
        for relay in self.relays.values():
            terminate(popens=[p for p in (relay.worker_proc, relay.exit_proc) if p is not None])
        for sshd in self.sshds:
            sshd.stop()
        if self.lab is not None:
            self.lab.close()

    # ------------------------------------------------------------------------- helpers

    def _client_argv(self, relay: Relay, mode: str, *extra: str) -> list[str]:
        port = BULK_PORT if mode in ("drain", "down", "up") else ECHO_PORT
        return [
            sys.executable, "-m", "bench.mux_lab_client", mode,
            "--socks-port", str(relay.socks_port), "--auth", f"{SOCKS_USER}:{SOCKS_PASSWORD}",
            "--host", Lab.outside_ip, "--port", str(port), *extra,
        ]  # fmt: skip

    def _spawn_client(self, relay: Relay, mode: str, *extra: str) -> subprocess.Popen[str]:
        assert self.lab is not None
        return self.lab.spawn(
            self.lab.worker, self._client_argv(relay, mode, *extra), cwd=str(REPO),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def _client(self, relay: Relay, mode: str, *extra: str, timeout: float = 300) -> Any:
        assert self.lab is not None
        res = self.lab.run(
            self.lab.worker, self._client_argv(relay, mode, *extra), check=False, timeout=timeout
        )
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        if not lines:
            return {"error": f"client rc={res.returncode}: {res.stderr.strip()[-800:]}"}
        return json.loads(lines[-1])

    @staticmethod
    def _readline(proc: subprocess.Popen[str]) -> Any:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"client ended (rc={proc.wait()}): {err[-2000:]}")
        return json.loads(line)

    @staticmethod
    def _tell(proc: subprocess.Popen[str], line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    def metrics(self, relay: Relay) -> dict[str, dict[str, float]]:
        lab = self.lab
        assert lab is not None
        out = {}
        for role, ns, host, port in (
            ("worker", lab.worker, "127.0.0.1", relay.worker_metrics),
            ("exit", lab.outside, lab.outside_ip, relay.exit_metrics),
        ):
            res = lab.run(ns, ["curl", "-sS", "--max-time", "10", f"http://{host}:{port}/metrics"],
                          check=False, timeout=30)  # fmt: skip
            samples = parse_samples(res.stdout)
            keep = ("relay_streams", "relay_carriers", "relay_reconnects", "relay_protocol",
                    "relay_limit", "relay_auth", "relay_resumes", "relay_credit", "relay_frames",
                    "relay_ssh", "relay_keep_warm", "relay_warm", "relay_handoffs")  # fmt: skip
            out[role] = {
                k: v for k, v in samples.items()
                if k.startswith(keep) and "_created" not in k and "_bucket" not in k
            }  # fmt: skip
        return out

    def login_connections(self, relay: Relay) -> int:
        assert self.lab is not None
        res = self.lab.run(
            self.lab.login,
            ["ss", "-Htn", "state", "established", "dst", Lab.outside_ip,
             "dport", "=", f":{relay.exit_port}"],
        )  # fmt: skip
        return len([line for line in res.stdout.splitlines() if line.strip()])

    def conntrack(self, relay: Relay) -> dict[str, int]:
        assert self.lab is not None
        total = self.lab.run(self.lab.fw, ["conntrack", "-C"]).stdout.strip()
        est = self.lab.run(
            self.lab.fw,
            ["conntrack", "-L", "-p", "tcp", "--dport", str(relay.exit_port),
             "--state", "ESTABLISHED"],
            check=False,
        ).stdout  # fmt: skip
        return {
            "total": int(total or 0),
            "established_to_exit": len([x for x in est.splitlines() if x.strip()]),
        }

    def time_wait(self) -> dict[str, int]:
        """TIME_WAIT sockets in the login (sshd -> exit) and outside (exit -> sink) namespaces."""
        assert self.lab is not None
        out = {}
        for role, ns in (("login", self.lab.login), ("outside", self.lab.outside)):
            res = self.lab.run(ns, ["ss", "-Htn", "state", "time-wait"], check=False)
            out[role] = len([line for line in res.stdout.splitlines() if line.strip()])
        return out

    def time_wait_to_exit(self, relay: Relay) -> int:
        """TIME_WAIT sockets on the login node towards this version's exit."""
        assert self.lab is not None
        res = self.lab.run(
            self.lab.login,
            ["ss", "-Htn", "state", "time-wait", "dst", Lab.outside_ip,
             "dport", "=", f":{relay.exit_port}"],
            check=False,
        )  # fmt: skip
        return len([line for line in res.stdout.splitlines() if line.strip()])

    def wait_streams_drained(self, relay: Relay, timeout: float = 90) -> float:
        """Wait until the exit reports no open streams; returns the last value seen."""
        deadline = time.monotonic() + timeout
        active = -1.0
        while time.monotonic() < deadline:
            active = self.metrics(relay)["exit"].get("relay_streams_active", -1.0)
            if active == 0:
                break
            time.sleep(1)
        return active

    # ------------------------------------------------------------------------- experiments

    def idle(self, relay: Relay) -> dict[str, Any]:
        n = self.args.streams.get(relay.name) or self.mode["streams"][relay.name]
        window = self.mode["idle_window"]
        log(f"idle {relay.name}: opening {n} streams")
        time.sleep(2)
        pss_before = relay.pss()
        cpu_before_open = relay.cpu()
        conns_before = self.login_connections(relay)
        ct_before = self.conntrack(relay)
        time_wait_before = self.time_wait()
        client = self._spawn_client(relay, "idle", "--count", str(n), "--concurrency", "100")
        result: dict[str, Any] = {"streams": n}
        # CPU of each process once a second while the streams open: where the time goes.
        timeline: list[tuple[float, dict[str, float]]] = []
        opening = threading.Event()
        t_open = time.monotonic()

        def sample() -> None:
            while not opening.wait(1.0):
                timeline.append(
                    (round(time.monotonic() - t_open, 2), _delta(relay.cpu(), cpu_before_open))
                )

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            try:
                opened = self._readline(client)
            finally:
                opening.set()
                sampler.join()
            result["open"] = opened
            result["open_cpu_timeline"] = timeline
            result["open_cpu"] = _delta(relay.cpu(), cpu_before_open)
            log(f"idle {relay.name}: {opened['opened']} open, {opened['failed']} failed in "
                f"{opened['seconds']:.1f} s")  # fmt: skip
            time.sleep(5)
            result["login_to_exit_tcp"] = {
                "before": conns_before,
                "after": self.login_connections(relay),
            }
            result["conntrack"] = {"before": ct_before, "after": self.conntrack(relay)}
            result["time_wait_before"] = time_wait_before
            pss_after = relay.pss()
            result["pss"] = {"before": pss_before, "after": pss_after}
            ok = max(opened["opened"], 1)
            result["pss_per_stream_kib"] = {
                role: (pss_after[role] - pss_before[role]) / 1024 / ok for role in pss_after
            }
            log(f"idle {relay.name}: measuring idle CPU for {window:.0f} s")
            c0, t0 = relay.cpu(), time.monotonic()
            time.sleep(window)
            c1, t1 = relay.cpu(), time.monotonic()
            cpu = _delta(c1, c0)
            result["idle_cpu_seconds"] = cpu
            result["idle_window"] = t1 - t0
            result["idle_cpu_pct"] = {k: 100 * v / (t1 - t0) for k, v in cpu.items()}
            result["idle_cpu_pct"]["total"] = 100 * sum(cpu.values()) / (t1 - t0)
            self._tell(client, "check")
            result["check"] = self._readline(client)
            log(f"idle {relay.name}: check {result['check']}")
            result["metrics"] = self.metrics(relay)
            self._tell(client, "close")
            client.wait(timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        result["exit_streams_after_close"] = self.wait_streams_drained(relay)
        return result

    def rate(self, relay: Relay) -> dict[str, Any]:
        seconds, parallel = self.mode["rate_seconds"], self.mode["rate_parallel"]
        tw0 = self.time_wait_to_exit(relay)
        c0 = relay.cpu()
        res = self._client(
            relay, "rate", "--seconds", str(seconds), "--parallel", str(parallel),
            timeout=seconds + 120,
        )  # fmt: skip
        res["cpu"] = _delta(relay.cpu(), c0)
        ok = max(res.get("ok", 0), 1)
        res["cpu_ms_per_stream"] = {k: 1000 * v / ok for k, v in res["cpu"].items()}
        res["parallel"] = parallel
        res["time_wait_to_exit"] = {"before": tw0, "after": self.time_wait_to_exit(relay)}
        log(f"rate {relay.name}: {res.get('per_second', 0):.0f}/s, {res.get('failed')} failed")
        return res

    def fairness(self, relay: Relay) -> dict[str, Any]:
        count, interval = self.mode["probe_count"], self.mode["probe_interval"]
        max_s = self.mode["probe_max_seconds"]
        run = f"run {count} {interval} {max_s}"
        probe = self._spawn_client(relay, "probe")
        drain: Optional[subprocess.Popen[str]] = None
        out: dict[str, Any] = {}
        try:
            self._readline(probe)
            self._tell(probe, run)
            idle = self._readline(probe)
            drain = self._spawn_client(relay, "drain", "--seconds", str(max_s + 5.0))
            time.sleep(1.5)
            self._tell(probe, run)
            loaded = self._readline(probe)
            # Where the download's bytes wait (after the probe, so ss does not disturb it).
            out["queues"] = [self.queues(relay) for _ in range(3)]
            self._tell(probe, "close")
            probe.wait(timeout=30)
            drained = self._readline(drain)
            drain.wait(timeout=30)
        finally:
            for proc in (probe, drain):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        out["idle"] = _stats(idle["samples"]) | {"error": idle["error"]}
        out["bulk"] = _stats(loaded["samples"]) | {"error": loaded["error"]}
        out["bulk_stream"] = drained
        out["raw"] = {"idle": idle["samples"], "bulk": loaded["samples"]}
        log(
            f"fairness {relay.name}: idle p50 {out['idle'].get('p50_ms', 0):.2f} ms, under bulk "
            f"p50 {out['bulk'].get('p50_ms', 0):.2f} p99 {out['bulk'].get('p99_ms', 0):.2f} ms "
            f"(bulk {drained.get('mb_per_s', 0):.0f} MB/s)"
        )
        return out

    def queues(self, relay: Relay) -> dict[str, int]:
        """Bytes queued in kernel sockets along the download path, summed per hop:
        exit -> sshd (exit's Send-Q), unread by sshd (Recv-Q), sshd -> worker (sshd's
        Send-Q), unread by the worker (Recv-Q)."""
        lab = self.lab
        assert lab is not None
        ssh_port, exit_port = f":{relay.sshd.port}", f":{relay.exit_port}"
        hops = {
            "exit_sendq": (lab.outside, ["sport", "=", exit_port], 1),
            "sshd_from_exit_recvq": (lab.login, ["dport", "=", exit_port], 0),
            "sshd_to_worker_sendq": (lab.login, ["sport", "=", ssh_port], 1),
            "worker_from_sshd_recvq": (lab.worker, ["dport", "=", ssh_port], 0),
        }
        out: dict[str, int] = {}
        for name, (ns, filt, column) in hops.items():
            res = lab.run(ns, ["ss", "-Htn", "state", "established", *filt], check=False)
            out[name] = sum(
                int(line.split()[column]) for line in res.stdout.splitlines() if line.strip()
            )
        return out

    def bulk(self, relay: Relay, direction: str) -> dict[str, Any]:
        size = self.mode["bulk_size"]
        c0 = relay.cpu()
        res = self._client(relay, direction, "--size", str(size), timeout=300)
        cpu = _delta(relay.cpu(), c0)
        res["cpu"] = cpu
        gib = size / (1 << 30)
        res["cpu_s_per_gib"] = {k: v / gib for k, v in cpu.items()}
        res["mb_per_s"] = size / res["seconds"] / 1e6 if res.get("seconds") else 0.0
        log(f"bulk {direction} {relay.name}: {res['mb_per_s']:.0f} MB/s ok={res.get('ok')}")
        return res

    def run(self, only: set[str]) -> dict[str, Any]:
        order = ["v2", "v1"]
        results: dict[str, Any] = {"idle": {}, "rate": {}, "fairness": {}, "bulk": {}}
        if "idle" in only:
            for name in order:
                results["idle"][name] = self.idle(self.relays[name])
            if only - {"idle"}:
                self.restart()
        for rep in range(self.mode["repeats"]):
            # Alternate which version goes first, so drifting machine load hits both alike.
            names = order if rep % 2 == 0 else order[::-1]
            for name in names if "rate" in only else ():
                results["rate"].setdefault(name, []).append(self.rate(self.relays[name]))
            for name in names if "fairness" in only else ():
                results["fairness"].setdefault(name, []).append(self.fairness(self.relays[name]))
            for name in names if "bulk" in only else ():
                for direction in ("down", "up"):
                    results["bulk"].setdefault(f"{name} {direction}", []).append(
                        self.bulk(self.relays[name], direction)
                    )
        results["metrics_end"] = {n: self.metrics(r) for n, r in self.relays.items()}
        return results


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _stats(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "max_ms": ordered[-1] * 1000,
    }


def _added(before_after: dict[str, int]) -> int:
    return before_after["after"] - before_after["before"]


def _tenths(r: dict[str, Any]) -> str:
    prog, step = r["open"]["progress"], r["open"]["progress_step"]
    if len(prog) < 2:
        return "-"
    last = prog[-1] - prog[-2]
    return f"{step / prog[0]:.0f} -> {step / last:.0f}" if last > 0 else "-"


def _med(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- summary


def summarize(results: dict[str, Any], meta: dict[str, Any]) -> str:
    out: list[str] = []
    out.append(f"# Protocol v2 vs v1 in the namespace lab ({meta['mode']})\n")
    out.append(f"Command: `{meta['command']}`  ")
    out.append(f"Date (UTC): {meta['started']}; host: {meta['host']}, {meta['cpus']} CPUs "
               f"(shared); load before: {meta['load_before']}  ")  # fmt: skip
    out.append(f"v2: {meta['versions']['v2']}; v1: {meta['versions']['v1']}  ")
    out.append(
        "Chain: client (worker ns) -> relay-worker SOCKS5 -> SSH direct-tcpip via sshd on the "
        "login ns -> nftables conntrack firewall -> relay-exit (outside ns) -> bench.sink. "
        f"Firewall idle timeout {meta['fw_idle_timeout']} s; heartbeat 25 s (default) on both; "
        "`tcp_tw_reuse=1` in the outside (exit) namespace only; "
        "v2 `carriers` 2 (default), v1 `warm_carriers` "
        f"{meta['v1_warm_carriers']}; exits `max_streams`/`max_streams_per_key` 50000"
        + (f"; extra settings: {', '.join(meta['settings'])}" if meta.get("settings") else "")
        + ".\n"
    )
    idle = results["idle"]
    out.append("## 1. Idle streams through one worker and one exit\n")
    if idle.get("v1", {}).get("streams", 0) < idle.get("v2", {}).get("streams", 0):
        out.append(
            f"v1 gets fewer streams: it holds two descriptors per stream at the exit (carrier "
            f"and destination) and the descriptor limit here is {meta['nofile']} (the hard "
            "limit cannot be raised in this container).\n"
        )
    out.append(
        "PSS and CPU per stream are (after - before) / streams opened; sshd = listener and "
        "the session's processes. After this experiment every sshd, exit and worker is "
        "restarted, so the later ones start from fresh daemons.\n"
    )
    out.append("| | v2 | v1 |")
    out.append("|---|---|---|")

    def row(label: str, fn: Any) -> None:
        cells = []
        for name in ("v2", "v1"):
            try:
                cells.append(fn(idle[name]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        out.append(f"| {label} | {cells[0]} | {cells[1]} |")

    row(
        "streams asked / opened / failed",
        lambda r: f"{r['streams']} / {r['open']['opened']} / {r['open']['failed']}",
    )
    row(
        "open time (s), streams/s",
        lambda r: f"{r['open']['seconds']:.1f}, {r['open']['opened'] / r['open']['seconds']:.0f}",
    )
    row(
        "CPU ms per stream opened (worker / sshd / exit)",
        lambda r: " / ".join(
            f"{1000 * r['open_cpu'][k] / r['open']['opened']:.2f}"
            for k in ("worker", "sshd", "exit")
        ),
    )
    row(
        "login->exit TCP connections (before -> after)",
        lambda r: f"{r['login_to_exit_tcp']['before']} -> {r['login_to_exit_tcp']['after']}",
    )
    row(
        "firewall conntrack entries, all (before -> after)",
        lambda r: f"{r['conntrack']['before']['total']} -> {r['conntrack']['after']['total']}",
    )
    row(
        "firewall conntrack ESTABLISHED to this exit",
        lambda r: (
            f"{r['conntrack']['before']['established_to_exit']} -> "
            f"{r['conntrack']['after']['established_to_exit']}"
        ),
    )
    row(
        "PSS growth per stream, KiB (worker / sshd / exit)",
        lambda r: " / ".join(
            f"{r['pss_per_stream_kib'][k]:.1f}" for k in ("worker", "sshd", "exit")
        ),
    )
    row(
        "PSS growth total, MiB (worker / sshd / exit)",
        lambda r: " / ".join(
            f"{(r['pss']['after'][k] - r['pss']['before'][k]) / 2**20:.1f}"
            for k in ("worker", "sshd", "exit")
        ),
    )
    row(
        "idle CPU, % of one core (worker / sshd / exit = total)",
        lambda r: (
            " / ".join(f"{r['idle_cpu_pct'][k]:.2f}" for k in ("worker", "sshd", "exit"))
            + f" = {r['idle_cpu_pct']['total']:.2f} (over {r['idle_window']:.0f} s)"
        ),
    )
    row(
        "echo after idling: alive / dead",
        lambda r: f"{r['check']['alive']} / {r['check']['dead']} ({r['check']['seconds']:.1f} s)",
    )
    row(
        "exit streams still open after the client closed",
        lambda r: f"{r['exit_streams_after_close']:.0f}",
    )

    out.append("\n## 2. New streams per second\n")
    reps = len(results["rate"].get("v2", []))
    par = results["rate"]["v2"][0]["parallel"] if reps else 0
    out.append(f"{par} parallel loops of SOCKS connect + 1-byte echo + close, "
               f"{meta['rate_seconds']:.0f} s each, median of {reps} runs "
               "(each run's value in brackets).\n")  # fmt: skip
    out.append("| | streams/s | failed | p50 / p99 ms per stream | CPU ms per stream "
               "(worker / sshd / exit) | login TIME_WAIT to the exit, added per run |")  # fmt: skip
    out.append("|---|---|---|---|---|---|")
    for name in ("v2", "v1"):
        runs = results["rate"].get(name, [])
        if not runs:
            continue
        ps = [r.get("per_second", 0.0) for r in runs]
        cpu = " / ".join(
            f"{_med([r['cpu_ms_per_stream'][k] for r in runs]):.2f}"
            for k in ("worker", "sshd", "exit")
        )
        out.append(
            f"| {name} | {_med(ps):.0f} ({', '.join(f'{p:.0f}' for p in ps)}) | "
            f"{sum(r.get('failed', 0) for r in runs)} | "
            f"{1000 * _med([r['latency'].get('p50', 0) for r in runs]):.1f} / "
            f"{1000 * _med([r['latency'].get('p99', 0) for r in runs]):.1f} | {cpu} | "
            f"{_med([_added(r['time_wait_to_exit']) for r in runs]):.0f} |"
        )

    out.append("\n## 3. Fairness: 1-byte echo round trips next to a full-speed download\n")
    out.append("Same worker, another stream downloading from the sink as fast as it can; "
               "medians over runs of each run's percentile.\n")  # fmt: skip
    out.append("| | idle p50 / p99 ms | under bulk p50 / p99 / max ms | samples under bulk | "
               "bulk stream MB/s | KiB queued: exit Send-Q / sshd Recv-Q / sshd Send-Q / "
               "worker Recv-Q |")  # fmt: skip
    out.append("|---|---|---|---|---|---|")
    for name in ("v2", "v1"):
        runs = results["fairness"].get(name, [])
        if not runs:
            continue

        def m(part: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
            return _med([r[part].get(key) for r in runs])

        out.append(
            f"| {name} | {m('idle', 'p50_ms'):.2f} / {m('idle', 'p99_ms'):.2f} | "
            f"{m('bulk', 'p50_ms'):.2f} / {m('bulk', 'p99_ms'):.2f} / {m('bulk', 'max_ms'):.1f}"
            f" | {', '.join(str(r['bulk']['n']) for r in runs)} | "
            f"{_med([r['bulk_stream'].get('mb_per_s') for r in runs]):.0f} | "
            + " / ".join(
                f"{_med([q[hop] for r in runs for q in r['queues']]) / 1024:.0f}"
                for hop in QUEUE_HOPS
            )
            + " |"
        )

    out.append("\n## 4. Bulk throughput and CPU per GiB\n")
    out.append(f"{meta['bulk_size'] >> 20} MiB per transfer, SHA-256 checked; medians over "
               "runs.\n")  # fmt: skip
    out.append("| | MB/s | all ok | CPU s per GiB: worker | sshd | exit | sum |")
    out.append("|---|---|---|---|---|---|---|")
    for key in ("v2 down", "v1 down", "v2 up", "v1 up"):
        runs = results["bulk"].get(key, [])
        if not runs:
            continue
        gib_cpu = {
            k: _med([r["cpu_s_per_gib"][k] for r in runs]) for k in ("worker", "sshd", "exit")
        }
        out.append(
            f"| {key} | {_med([r['mb_per_s'] for r in runs]):.0f} "
            f"({', '.join(format(r['mb_per_s'], '.0f') for r in runs)}) | "
            f"{all(r.get('ok') for r in runs)} | {gib_cpu['worker']:.2f} | {gib_cpu['sshd']:.2f} | "
            f"{gib_cpu['exit']:.2f} | {sum(gib_cpu.values()):.2f} |"
        )
    out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run, about 5 minutes")
    parser.add_argument("--v1-root", default="/work/v1-39076cc",
                        help="worktree of the v1 commit with its own .venv")  # fmt: skip
    parser.add_argument("--v1-warm-carriers", type=int, default=None,
                        help="v1 worker warm_carriers (default: v1's default, 2)")  # fmt: skip
    parser.add_argument("--v2-streams", type=int, default=0, help="override idle streams")
    parser.add_argument("--v1-streams", type=int, default=0, help="override idle streams")
    parser.add_argument("--fw-idle-timeout", type=int, default=40,
                        help="seconds the firewall keeps an idle connection")  # fmt: skip
    parser.add_argument("--only", default="", help="comma list: idle,rate,fairness,bulk")
    parser.add_argument(
        "--set", action="append", default=[], metavar="VERSION.ROLE.KEY=VALUE",
        help="extra config key, e.g. v2.exit.replay_buffer=16MiB (repeatable)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=0, help="override the repeats")
    parser.add_argument("--out", default="", help="results directory")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args()
    args.streams = {"v2": args.v2_streams, "v1": args.v1_streams}
    args.settings = {}
    for item in args.set:
        target, _, value = item.partition("=")
        version, role, key = target.split(".", 2)
        parsed: Any = int(value) if value.isdigit() else value
        args.settings.setdefault((version, role), {})[key] = parsed
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd, nftables)", file=sys.stderr)
        return 2
    if not (Path(args.v1_root) / ".venv" / "bin" / "relay-exit").exists():
        print(f"no v1 venv at {args.v1_root}/.venv (see the module docstring)", file=sys.stderr)
        return 2
    # Inherited by every process of the lab; raising the hard limit needs CAP_SYS_RESOURCE.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    mode_name = "quick" if args.quick else "full"
    started = datetime.now(timezone.utc)
    out_dir = (
        Path(args.out)
        if args.out
        else RESULTS / (started.strftime("%Y%m%d") + "-mux-lab" + ("-quick" if args.quick else ""))
    )
    workdir = Path(tempfile.mkdtemp(prefix="mux-lab-"))
    bench = Bench(args, workdir)
    meta: dict[str, Any] = {
        "mode": mode_name,
        "command": "cd "
        + shlex.quote(str(REPO))
        + " && "
        + shlex.join([".venv/bin/python", "-m", "bench.mux_lab", *sys.argv[1:]])
        + "  # as root",
        "started": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "fw_idle_timeout": args.fw_idle_timeout,
        "v1_warm_carriers": args.v1_warm_carriers
        if args.v1_warm_carriers is not None
        else "2 (default)",
        "rate_seconds": MODES[mode_name]["rate_seconds"],
        "bulk_size": MODES[mode_name]["bulk_size"],
        "mode_settings": MODES[mode_name],
        "workdir": str(workdir),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "settings": args.set,
    }
    if not args.v1_streams:
        wanted = MODES[mode_name]["streams"]["v1"]
        fits = (meta["nofile"] - 1000) // 2 // 1000 * 1000
        if fits < wanted:
            args.streams["v1"] = max(fits, 1000)
            log(f"v1 idle streams {args.streams['v1']}: descriptor limit {meta['nofile']}")
    t0 = time.monotonic()
    try:
        bench.start()
        meta["versions"] = {
            n: f"{r.commit} ({r.root}{'; changed: ' + ', '.join(r.dirty) if r.dirty else ''})"
            for n, r in bench.relays.items()
        }
        meta["configs"] = {n: r.configs for n, r in bench.relays.items()}
        results = bench.run(set(args.only.split(",")) if args.only else set(EXPERIMENTS))
    finally:
        bench.close()
    meta["seconds"] = round(time.monotonic() - t0, 1)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                     indent=1))  # fmt: skip
    summary = summarize(results, meta)
    (out_dir / "summary.md").write_text(summary)
    print(summary)
    log(f"results in {out_dir} ({meta['seconds']:.0f} s); lab work directory {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

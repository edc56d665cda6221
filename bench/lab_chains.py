"""The relay next to the chain it replaces in the namespace lab: throughput, CPU, setup, rate.

    python -m bench.lab_chains [--quick] [--rounds N] [--size-mib N] [--chains a,b,...]
                               [--rate-seconds S] [--rate-parallel P] [--out DIR]  # as root

``python -m bench`` runs this first (its primary table) through :func:`run_lab`, then the
loopback bench.

One lab (tests/support/netns.py: worker, login, fw, outside namespaces; the fw namespace lets only
new login -> outside TCP to ports 80/443 through) holds every chain at once, each with its own
sshd in the login namespace so its sshd processes can be told apart:

    relay-openssh   client -> relay-worker (ssh_client = "openssh": the node's own ssh -N,
                    frames over its forwarded socket; socks 127.0.0.1:1080) -> sshd :22
                    -> relay-exit 203.0.113.2:80 -> sink
    relay-asyncssh  the same with ssh_client = "asyncssh" (SSH in-process; socks :1081)
                    -> sshd :2222 -> relay-exit 203.0.113.2:443 -> sink
    relay-openssh-2ssh
                    relay-openssh with ssh_connections = 2 (carriers spread over two ssh
                    processes; socks :1084) -> sshd :2225 -> relay-exit 203.0.113.4:80 -> sink;
                    in the default set only when relay/config/schema.py has the option
    old-chain       client -SOCKS5-> ssh -D 127.0.0.1:1082 (OpenSSH client, default cipher)
                    -> sshd :2223 -> danted 203.0.113.3:80 -SOCKS5-> sink; the client does
                    both SOCKS5 hops itself, as proxychains4 with two hops does
    old-chain-gcm   the same with ssh -D -o Ciphers=aes128-gcm@openssh.com (socks :1083)
                    -> sshd :2224 -> danted 203.0.113.3:443
    direct          client -> sink, only if the worker namespace can route to the outside
                    (in this lab it cannot: the compute node has no route out)

The sink (bench.sink) runs in the outside namespace on 203.0.113.2 (bulk 8001, echo 8002);
the dantes use a second address, 203.0.113.3, and relay-openssh-2ssh's exit a third,
203.0.113.4, on the same interface, since the firewall passes only ports 80 and 443. The
client (bench.lab_chains_client) runs in the worker namespace. Relays run with their shipped
defaults (relay-openssh-2ssh: ssh_connections = 2); everything else as the prototype ran it.

Each round, in an order rotated from round to round: setup latency (fresh streams, connect to
echoed byte, one after the other) for every chain, then a download for every chain, then an
upload for every chain, then the connection rate for every chain (P client threads, each
opening a stream, echoing one byte and closing, back to back, for S seconds). Transfers are
SHA-256 checked end to end; a mismatch or a broken transfer stops the run with exit status 1
(results.json keeps what was measured and why).
CPU is read from /proc before and after each transfer, per process of the chain (process trees:
relay-worker itself, its ssh children, the chain's sshd with its session processes, the exit /
ssh -D / danted with their children); the sink's and the client's CPU are recorded as context.

Results: bench/results/<UTC date and time>-lab-chains[-quick]/results.json (raw) and summary.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Optional

from bench import procstat
from tests.support.netns import Lab
from tests.support.proc import terminate
from tests.support.relays import (
    KEY_ID,
    SECRET,
    SOCKS_PASSWORD,
    SOCKS_USER,
    write_config,
    write_private,
)
from tests.support.sshd import Sshd, start_sshd

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
BULK_PORT, ECHO_PORT = 8001, 8002
DANTE_IP = "203.0.113.3"
EXIT2_IP = "203.0.113.4"
GCM = "aes128-gcm@openssh.com"
TWO_SSH = "relay-openssh-2ssh"
ALL_CHAINS = (
    "relay-openssh",
    "relay-asyncssh",
    TWO_SSH,
    "old-chain",
    "old-chain-gcm",
    "direct",
)
BASELINES = ("old-chain", "old-chain-gcm")
# Per chain: sshd port in the login namespace, the exit's (or dante's) address and port, SOCKS
# port.
PLAN: dict[str, tuple[int, str, int, int]] = {
    "relay-openssh": (22, Lab.outside_ip, 80, 1080),
    "relay-asyncssh": (2222, Lab.outside_ip, 443, 1081),
    TWO_SSH: (2225, EXIT2_IP, 80, 1084),
    "old-chain": (2223, DANTE_IP, 80, 1082),
    "old-chain-gcm": (2224, DANTE_IP, 443, 1083),
}
# Extra worker settings per relay chain (on top of the shipped defaults).
WORKER_EXTRA: dict[str, dict[str, Any]] = {TWO_SSH: {"ssh_connections": 2}}
MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "size_mib": 32,
        "rounds": 1,
        "latency_count": 20,
        "rate_seconds": 2.0,
        "rate_parallel": 4,
    },
    "full": {
        "size_mib": 200,
        "rounds": 3,
        "latency_count": 50,
        "rate_seconds": 5.0,
        "rate_parallel": 8,
    },
}


class BenchFailure(RuntimeError):
    """A transfer failed its checksum or broke; the run stops."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text[:90]


def _med(values: list[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def ssh_connections_supported() -> bool:
    """Whether the relay in this tree knows the worker option ``ssh_connections``: until it
    does, relay-openssh-2ssh would only measure a worker refusing its configuration."""
    from relay.config.schema import WORKER_OPTIONS

    return any(o.key == "ssh_connections" for o in WORKER_OPTIONS)


def default_chains(with_direct: bool = True) -> list[str]:
    """The chains measured when none are named: every one the tree supports."""
    names = [n for n in ALL_CHAINS if with_direct or n != "direct"]
    if not ssh_connections_supported():
        names.remove(TWO_SSH)
    return names


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order of the chains: rotated by one each round, so no chain always goes first
    (into a cold page cache, after the sink's warm-up) or last."""
    if not names:
        return []
    k = r % len(names)
    return names[k:] + names[:k]


@dataclass
class Chain:
    """One chain: how the client reaches the sink through it, and its processes by role."""

    name: str
    description: str
    hops: list[str]
    # role -> (root pid, "self" | "tree" | "descendants")
    roles: dict[str, tuple[int, str]] = field(default_factory=dict)
    sshd: Optional[Sshd] = None
    configs: dict[str, str] = field(default_factory=dict)

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for role, (root, kind) in self.roles.items():
            tree = procstat.tree([root])
            if kind == "self":
                out[role] = [root] if root in tree else []
            elif kind == "descendants":
                out[role] = [p for p in tree if p != root]
            else:
                out[role] = tree
        return out

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """pid -> (role, CPU seconds incl. reaped children) for every process of the chain."""
        snap: dict[int, tuple[str, float]] = {}
        for role, pids in self.pids().items():
            for pid in pids:
                snap[pid] = (role, procstat.cpu_seconds([pid]))
        return snap


def cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], roles: list[str]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Role totals (after - before: a child reaped in between moved its time into its parent's
    cutime, so sums stay right) and each live process's own share."""
    totals = dict.fromkeys(roles, 0.0)
    for sign, snap in ((-1.0, before), (1.0, after)):
        for role, cpu in snap.values():
            totals[role] = totals.get(role, 0.0) + sign * cpu
    procs: list[dict[str, Any]] = []
    for pid, (role, cpu) in after.items():
        used = cpu - before.get(pid, (role, 0.0))[1]
        procs.append({"pid": pid, "role": role, "cmd": _cmdline(pid), "cpu_s": round(used, 3)})
    procs.sort(key=lambda p: float(p["cpu_s"]), reverse=True)
    return {k: round(v, 3) for k, v in totals.items()}, procs


class Bench:
    def __init__(self, workdir: Path, fw_idle_timeout: int = 300) -> None:
        self.fw_idle_timeout = fw_idle_timeout
        self.workdir = workdir
        self.lab: Optional[Lab] = None
        self.sshds: list[Sshd] = []
        self.chains: dict[str, Chain] = {}
        self.sink: Optional[subprocess.Popen[Any]] = None
        self.logs: list[IO[Any]] = []
        self.direct_note = ""

    # ------------------------------------------------------------------------- set-up

    def start(self, names: list[str]) -> None:
        # The firewall forgets idle connections after this; long enough that it plays no part
        # here (bench.mux_lab measures idling), the relays' 25 s heartbeats would cope anyway.
        self.lab = Lab.create(self.workdir / "lab", idle_timeout=self.fw_idle_timeout)
        lab = self.lab
        lab.run(lab.outside, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        for extra_ip in (DANTE_IP, EXIT2_IP):
            lab.run(lab.outside, ["ip", "addr", "add", f"{extra_ip}/24", "dev", "to-fw"])
        self.sink = lab.spawn(
            lab.outside,
            [
                sys.executable,
                "-m",
                "bench.sink",
                "--host",
                lab.outside_ip,
                "--bulk-port",
                str(BULK_PORT),
                "--echo-port",
                str(ECHO_PORT),
            ],
            cwd=str(REPO),
        )
        lab.wait_listening(lab.outside, BULK_PORT, proc=self.sink)
        lab.wait_listening(lab.outside, ECHO_PORT, proc=self.sink)
        client_key: Optional[Path] = None
        for name in names:
            if name == "direct":
                self._add_direct()
                continue
            ssh_port = PLAN[name][0]
            # DEBUG1 only so the log names the negotiated cipher; a few lines per channel.
            sshd = start_sshd(
                self.workdir / f"sshd-{name}",
                host=lab.login_ip,
                port=ssh_port,
                netns=lab.login,
                extra_config={"LogLevel": "DEBUG1"},
                client_key=client_key,
            )
            client_key = sshd.client_key
            self.sshds.append(sshd)
            if name.startswith("relay-"):
                chain = self._add_relay(name, sshd)
            else:
                chain = self._add_old_chain(name, sshd)
            self.chains[name] = chain
            self._wait_ready(chain)
            log(f"{name} up: {chain.description}")

    def _log_file(self, path: Path) -> IO[Any]:
        fh = path.open("a")
        self.logs.append(fh)
        return fh

    def _add_direct(self) -> None:
        lab = self.lab
        assert lab is not None
        probe = lab.tcp_connect(lab.worker, lab.outside_ip, BULK_PORT, timeout=2)
        if not probe.get("connected"):
            self.direct_note = (
                f"direct skipped: the worker namespace cannot reach {lab.outside_ip}:"
                f"{BULK_PORT} ({probe.get('error')}); the lab's compute node has no route out, "
                "as on the real site"
            )
            log(self.direct_note)
            return
        self.chains["direct"] = Chain("direct", "client -> sink (no proxy)", hops=[])

    def _add_relay(self, name: str, sshd: Sshd) -> Chain:
        lab = self.lab
        assert lab is not None
        _, exit_host, exit_port, socks_port = PLAN[name]
        client = name.split("-")[1]
        wd = self.workdir / name
        wd.mkdir(parents=True, exist_ok=True)
        keys = write_private(wd / "exit.keys", f"{KEY_ID} {SECRET}\n")
        exit_cfg = write_config(
            wd / "exit.toml",
            "exit",
            {
                "listen": f"{exit_host}:{exit_port}",
                "keys": str(keys),
                "allow": [f"{lab.outside_ip}/32:*"],
            },
        )
        exit_proc = lab.spawn(
            lab.outside,
            [str(BIN / "relay-exit"), "--config", str(exit_cfg)],
            stdout=self._log_file(wd / "exit.log"),
            stderr=subprocess.STDOUT,
        )
        lab.wait_listening(lab.outside, exit_port, timeout=15, proc=exit_proc)
        secret = write_private(wd / "worker.secret", SECRET + "\n")
        auth = write_private(wd / "socks.auth", f"{SOCKS_USER}:{SOCKS_PASSWORD}\n")
        worker_cfg = write_config(
            wd / "worker.toml",
            "worker",
            {
                "socks": f"127.0.0.1:{socks_port}",
                "socks_auth": str(auth),
                "login": [f"{sshd.user}@{sshd.host}:{sshd.port}"],
                "ssh_client": client,
                "ssh_key": str(sshd.client_key),
                "known_hosts": str(sshd.known_hosts),
                "exit": [f"{exit_host}:{exit_port}"],
                "key_id": KEY_ID,
                "secret_file": str(secret),
                **WORKER_EXTRA.get(name, {}),
            },
        )
        worker = lab.spawn(
            lab.worker,
            [str(BIN / "relay-worker"), "--config", str(worker_cfg)],
            stdout=self._log_file(wd / "worker.log"),
            stderr=subprocess.STDOUT,
        )
        try:
            lab.wait_listening(lab.worker, socks_port, timeout=15, proc=worker)
        except Exception as exc:
            tail = (wd / "worker.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name}: relay-worker did not start: {exc}\n{tail}") from exc
        roles: dict[str, tuple[int, str]] = {"worker": (worker.pid, "self")}
        if client == "openssh":
            roles["ssh"] = (worker.pid, "descendants")
        roles["sshd"] = (sshd.pid, "tree")
        roles["exit"] = (exit_proc.pid, "tree")
        extra = "".join(f", {k} = {v!r}" for k, v in WORKER_EXTRA.get(name, {}).items())
        return Chain(
            name,
            f"client -> relay-worker (ssh_client = {client!r}{extra}) -> sshd -> relay-exit"
            " -> sink",
            hops=[f"127.0.0.1:{socks_port}:{SOCKS_USER}:{SOCKS_PASSWORD}"],
            roles=roles,
            sshd=sshd,
            configs={"exit": exit_cfg.read_text(), "worker": worker_cfg.read_text()},
        )

    def _add_old_chain(self, name: str, sshd: Sshd) -> Chain:
        lab = self.lab
        assert lab is not None
        _, dante_host, dante_port, socks_port = PLAN[name]
        wd = self.workdir / name
        wd.mkdir(parents=True, exist_ok=True)
        # As in bench.chains.start_dante: danted binds its outgoing sockets to the external
        # address; here that is its own address, the sink is reached over the namespace's lo.
        conf = wd / "danted.conf"
        conf.write_text(
            f"logoutput: {wd / 'danted.log'}\n"
            f"internal: {dante_host} port = {dante_port}\nexternal: {dante_host}\n"
            "clientmethod: none\nsocksmethod: none\n"
            "user.privileged: root\nuser.unprivileged: nobody\n"
            f"client pass {{ from: {lab.login_out_ip}/32 to: 0.0.0.0/0 }}\n"
            f"socks pass {{ from: {lab.login_out_ip}/32 to: {lab.outside_ip}/32 }}\n"
        )
        dante = lab.spawn(
            lab.outside,
            ["/usr/sbin/danted", "-f", str(conf), "-p", str(wd / "danted.pid")],
            stdout=self._log_file(wd / "danted.out"),
            stderr=subprocess.STDOUT,
        )
        lab.wait_listening(lab.outside, dante_port, timeout=15, proc=dante)
        options = ["-N", "-D", f"127.0.0.1:{socks_port}", "-o", "ExitOnForwardFailure=yes"]
        if name.endswith("-gcm"):
            options += ["-o", f"Ciphers={GCM}"]
        ssh_argv = sshd.ssh_argv(options=options)
        ssh = lab.spawn(
            lab.worker,
            ssh_argv,
            stdout=self._log_file(wd / "ssh.log"),
            stderr=subprocess.STDOUT,
        )
        lab.wait_listening(lab.worker, socks_port, timeout=15, proc=ssh)
        cipher = f"-o Ciphers={GCM}" if name.endswith("-gcm") else "default cipher"
        return Chain(
            name,
            f"client -SOCKS5-> ssh -D ({cipher}) -> sshd -> danted -SOCKS5-> sink",
            hops=[f"127.0.0.1:{socks_port}", f"{dante_host}:{dante_port}"],
            roles={
                "ssh": (ssh.pid, "tree"),
                "sshd": (sshd.pid, "tree"),
                "danted": (dante.pid, "tree"),
            },
            sshd=sshd,
            configs={"ssh": shlex.join(ssh_argv), "danted": conf.read_text()},
        )

    def _wait_ready(self, chain: Chain) -> None:
        """One echoed byte end to end proves the chain is up (the worker logs in and opens its
        carriers in the background)."""
        deadline = time.monotonic() + 45
        while True:
            res = self._client(chain, "latency", "--count", "1", "--timeout", "10", timeout=60)
            if res.get("samples"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{chain.name} chain not working: {res}")
            time.sleep(0.5)

    def ciphers(self, chain: Chain) -> list[str]:
        """The ciphers sshd's log says this chain's SSH connections negotiated."""
        if chain.sshd is None:
            return []
        text = chain.sshd.log_path.read_text(errors="replace")
        found = re.findall(r"kex: client->server cipher: (\S+)", text)
        return sorted(set(found))

    def ssh_logins(self, chain: Chain) -> int:
        """SSH logins sshd accepted for this chain (1 = the connection lasted the whole run)."""
        if chain.sshd is None:
            return 0
        return chain.sshd.log_path.read_text(errors="replace").count("Accepted publickey for")

    def relay_events(self, chain: Chain) -> dict[str, int]:
        """Reconnects and losses the relay worker logged during the run (0 when healthy)."""
        path = self.workdir / chain.name / "worker.log"
        if not chain.name.startswith("relay-") or not path.exists():
            return {}
        text = path.read_text(errors="replace")
        return {
            key: text.count(needle)
            for key, needle in (
                ("ssh_lost", "SSH connection lost"),
                ("carrier_lost", "carrier lost"),
                ("session_lost", "session lost"),
            )
        }

    def close(self) -> None:
        # Clients of sshd first (workers, ssh -D), then sshd, then the rest with the lab.
        lab = self.lab
        try:
            if lab is not None:
                firsts = [
                    pid
                    for c in self.chains.values()
                    for role, (pid, _) in c.roles.items()
                    if role in ("worker", "ssh")
                ]
                terminate(pids=firsts)
            for sshd in self.sshds:
                sshd.stop()
        finally:
            if lab is not None:
                lab.close()
            for fh in self.logs:
                fh.close()

    # ------------------------------------------------------------------------- measuring

    def _client(self, chain: Chain, mode: str, *extra: str, timeout: float = 300) -> Any:
        lab = self.lab
        assert lab is not None
        port = ECHO_PORT if mode in ("latency", "rate") else BULK_PORT
        argv = [
            sys.executable,
            "-m",
            "bench.lab_chains_client",
            mode,
            "--host",
            lab.outside_ip,
            "--port",
            str(port),
        ]
        for hop in chain.hops:
            argv += ["--hop", hop]
        argv += list(extra)
        res = subprocess.run(
            ["ip", "netns", "exec", lab.worker, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=str(REPO),
        )
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        if not lines:
            return {"error": f"client rc={res.returncode}: {res.stderr.strip()[-1500:]}"}
        out: dict[str, Any] = json.loads(lines[-1])
        out["rc"] = res.returncode
        return out

    def latency(self, chain: Chain, count: int) -> dict[str, Any]:
        res = self._client(chain, "latency", "--count", str(count), "--timeout", "10")
        samples = res.get("samples", [])
        if not samples:
            raise BenchFailure(f"{chain.name}: no stream could be opened: {res}")
        ordered = sorted(samples)
        out = {
            "n": len(samples),
            "errors": res.get("errors", {}),
            "p50_ms": statistics.median(samples) * 1000,
            "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000,
            "min_ms": ordered[0] * 1000,
            "max_ms": ordered[-1] * 1000,
            "samples_ms": [round(s * 1000, 3) for s in samples],
        }
        log(
            f"latency {chain.name}: p50 {out['p50_ms']:.2f} ms, p90 {out['p90_ms']:.2f} ms"
            + (f", errors {out['errors']}" if out["errors"] else "")
        )
        return out

    def transfer(self, chain: Chain, direction: str, size: int) -> dict[str, Any]:
        assert self.sink is not None
        roles = list(chain.roles)
        before = chain.snapshot()
        sink0 = procstat.tree_cpu([self.sink.pid])
        res = self._client(
            chain, direction, "--size", str(size), timeout=max(180.0, size / 2e6 + 60)
        )
        sink1 = procstat.tree_cpu([self.sink.pid])
        after = chain.snapshot()
        if not res.get("ok"):
            raise BenchFailure(
                f"{chain.name} {direction} {size} bytes FAILED the end-to-end check: "
                f"{res.get('error')} (client rc {res.get('rc')}; got {res.get('bytes')} bytes, "
                f"sha256 {res.get('digest') or '-'}, expected {res.get('expected', '-')})"
            )
        totals, procs = cpu_delta(before, after, roles)
        seconds = res["seconds"]
        gib = size / (1 << 30)
        res["mb_per_s"] = size / seconds / 1e6
        res["cpu_s"] = totals
        res["cpu_s_per_gib"] = {k: v / gib for k, v in totals.items()}
        res["cpu_s_per_gib"]["total"] = sum(totals.values()) / gib
        for p in procs:
            p["core_pct"] = round(100 * p["cpu_s"] / seconds, 1)
        res["processes"] = procs
        res["sink_cpu_s"] = round(sink1 - sink0, 3)
        res["context_core_pct"] = {
            "client": round(100 * res.get("client_cpu", 0.0) / seconds, 1),
            "sink": round(100 * (sink1 - sink0) / seconds, 1),
        }
        busiest = procs[0] if procs else None
        log(
            f"{direction} {chain.name}: {res['mb_per_s']:.0f} MB/s, "
            f"{res['cpu_s_per_gib']['total']:.2f} CPU s/GiB"
            + (
                f"; busiest {busiest['role']} pid {busiest['pid']} {busiest['core_pct']:.0f}%"
                if busiest
                else ""
            )
            + f"; client {res['context_core_pct']['client']:.0f}%, "
            f"sink {res['context_core_pct']['sink']:.0f}%"
        )
        return res

    def rate(self, chain: Chain, seconds: float, parallel: int) -> dict[str, Any]:
        """New streams per second from ``parallel`` client loops, and the chain's CPU per
        stream; every stream carries one echoed byte, so a stream counts only if it worked."""
        before = chain.snapshot()
        res = self._client(
            chain,
            "rate",
            "--seconds",
            str(seconds),
            "--parallel",
            str(parallel),
            "--timeout",
            "10",
            timeout=seconds + 120,
        )
        after = chain.snapshot()
        if not res.get("ok"):
            raise BenchFailure(f"{chain.name}: no stream could be opened in the rate test: {res}")
        totals, _ = cpu_delta(before, after, list(chain.roles))
        ok = res["ok"]
        res["cpu_s"] = totals
        res["cpu_ms_per_stream"] = 1000 * sum(totals.values()) / ok
        res["client_core_pct"] = round(100 * res.get("client_cpu", 0.0) / res["seconds"], 1)
        log(
            f"rate {chain.name}: {res['per_second']:.0f} streams/s ({parallel} loops), "
            f"{res['cpu_ms_per_stream']:.2f} chain CPU ms/stream, "
            f"client {res['client_core_pct']:.0f}%"
            + (f", errors {res['errors']}" if res.get("errors") else "")
        )
        return res

    def run(self, params: dict[str, Any], out: dict[str, Any]) -> None:
        """Fills out["rounds"] as it goes, so a failure keeps what was measured.

        params: rounds, size_mib, latency_count, rate_seconds, rate_parallel (as in MODES)."""
        names = list(self.chains)
        rounds, size = params["rounds"], params["size_mib"] << 20
        for r in range(rounds):
            order = round_order(names, r)
            log(f"round {r + 1}/{rounds}: {', '.join(order)}")
            entry: dict[str, Any] = {"round": r + 1, "order": order, "results": {}}
            out["rounds"].append(entry)
            results = entry["results"]
            for name in order:
                results[name] = {
                    "latency": self.latency(self.chains[name], params["latency_count"])
                }
            for direction in ("down", "up"):
                for name in order:
                    results[name][direction] = self.transfer(self.chains[name], direction, size)
            if params.get("rate_seconds"):
                for name in order:
                    results[name]["rate"] = self.rate(
                        self.chains[name], params["rate_seconds"], params["rate_parallel"]
                    )


def bench_as_root(prefix: str) -> Bench:
    """A lab Bench working in a new temporary directory; exits with status 2 unless root."""
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd, nftables)", file=sys.stderr)
        raise SystemExit(2)
    return Bench(Path(tempfile.mkdtemp(prefix=prefix)))


# ----------------------------------------------------------------------------- summary


def aggregate(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Medians over rounds per chain (latency: over all samples pooled)."""
    agg: dict[str, Any] = {}
    for name in names:
        runs = [e["results"][name] for e in rounds if name in e["results"]]
        a: dict[str, Any] = {}
        samples = [s for r in runs if "latency" in r for s in r["latency"]["samples_ms"]]
        if samples:
            ordered = sorted(samples)
            a["latency_p50_ms"] = statistics.median(samples)
            a["latency_p90_ms"] = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            a["latency_n"] = len(samples)
            a["latency_errors"] = sum(sum(r["latency"]["errors"].values()) for r in runs)
        rates = [r["rate"] for r in runs if "rate" in r]
        if rates:
            a["rate"] = {
                "n": len(rates),
                "per_second": _med([x["per_second"] for x in rates]),
                "per_second_runs": [round(x["per_second"], 1) for x in rates],
                "cpu_ms_per_stream": _med([x["cpu_ms_per_stream"] for x in rates]),
                "client_core_pct": _med([x["client_core_pct"] for x in rates]),
                "errors": sum(sum(x["errors"].values()) for x in rates),
                "parallel": rates[0]["parallel"],
            }
        for d in ("down", "up"):
            done = [r[d] for r in runs if d in r]
            if not done:
                continue
            roles = list(done[0]["cpu_s_per_gib"])
            a[d] = {
                "n": len(done),
                "mb_per_s": _med([x["mb_per_s"] for x in done]),
                "mb_per_s_runs": [round(x["mb_per_s"], 1) for x in done],
                "cpu_s_per_gib": {k: _med([x["cpu_s_per_gib"][k] for x in done]) for k in roles},
                "busiest": [
                    {k: x["processes"][0][k] for k in ("role", "cmd", "core_pct")}
                    for x in done
                    if x["processes"]
                ],
                "client_core_pct": _med([x["context_core_pct"]["client"] for x in done]),
                "sink_core_pct": _med([x["context_core_pct"]["sink"] for x in done]),
            }
        agg[name] = a
    return agg


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing (a chain not measured, a step skipped)."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def figure(agg: dict[str, Any], name: str, key: str) -> Optional[float]:
    """One median of one chain: ``down``/``up`` MB/s, ``cpu_down``/``cpu_up`` CPU s/GiB over
    the whole chain, ``p50`` setup ms, ``rate`` new streams/s; None if not measured."""
    a = agg.get(name, {})
    value: Any = None
    if key in ("down", "up"):
        value = a.get(key, {}).get("mb_per_s")
    elif key in ("cpu_down", "cpu_up"):
        value = a.get(key[4:], {}).get("cpu_s_per_gib", {}).get("total")
    elif key == "p50":
        value = a.get("latency_p50_ms")
    elif key == "rate":
        value = a.get("rate", {}).get("per_second")
    return None if value is None else float(value)


RATIO_KEYS = (
    ("down", "MB/s down"),
    ("up", "MB/s up"),
    ("cpu_down", "CPU/GiB down"),
    ("cpu_up", "CPU/GiB up"),
    ("p50", "setup p50"),
    ("rate", "streams/s"),
)


def primary_table(agg: dict[str, Any], names: list[str]) -> list[str]:
    """The lab's main table: one row per chain, medians over rounds."""

    def mbs(a: dict[str, Any], d: str) -> str:
        if d not in a:
            return "-"
        runs = a[d]["mb_per_s_runs"]
        extra = f" ({', '.join(f'{x:.0f}' for x in runs)})" if len(runs) > 1 else ""
        return f"{a[d]['mb_per_s']:.0f}{extra}"

    def cpu(a: dict[str, Any], d: str) -> str:
        if d not in a:
            return "-"
        per = a[d]["cpu_s_per_gib"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if k != "total")
        return f"**{per['total']:.2f}**" + (f" ({parts})" if parts else "")

    def lat(a: dict[str, Any]) -> str:
        if "latency_p50_ms" not in a:
            return "-"
        failed = f" ({a['latency_errors']} failed)" if a.get("latency_errors") else ""
        return f"{a['latency_p50_ms']:.2f} / {a['latency_p90_ms']:.2f}{failed}"

    def rate(a: dict[str, Any]) -> str:
        r = a.get("rate")
        if not r:
            return "-"
        runs = r["per_second_runs"]
        extra = f" ({', '.join(f'{x:.0f}' for x in runs)})" if len(runs) > 1 else ""
        failed = f", {r['errors']} failed" if r["errors"] else ""
        return f"{r['per_second']:.0f}{extra} [{r['cpu_ms_per_stream']:.2f} ms{failed}]"

    out = [
        "| chain | down MB/s | up MB/s | CPU s/GiB down: **all processes** (per process) "
        "| CPU s/GiB up: **all processes** (per process) | setup p50 / p90 ms "
        "| new streams/s [chain CPU ms per stream] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        a = agg.get(name, {})
        cells = [name, mbs(a, "down"), mbs(a, "up"), cpu(a, "down"), cpu(a, "up"), lat(a)]
        out.append("| " + " | ".join([*cells, rate(a)]) + " |")
    return out


def ratio_table(agg: dict[str, Any], names: list[str]) -> list[str]:
    """Every other chain against each old chain, from the medians of the same run."""
    base = [b for b in BASELINES if b in agg and b in names]
    others = [n for n in names if n not in BASELINES]
    if not base or not others:
        return []
    out = [
        "| chain / baseline | " + " | ".join(label for _, label in RATIO_KEYS) + " |",
        "|---|" + "---|" * len(RATIO_KEYS),
    ]
    for name in others:
        for b in base:
            cells = [_fmt(ratio(figure(agg, name, k), figure(agg, b, k))) for k, _ in RATIO_KEYS]
            out.append(f"| {name} / {b} | " + " | ".join(cells) + " |")
    return out


RATIO_NOTE = (
    "Ratios are of medians of this run. Above 1 is better for MB/s and streams/s; below 1 is "
    "better for CPU per GiB and setup time."
)


def method_note(meta: dict[str, Any]) -> str:
    """How the lab figures were made, in one paragraph."""
    rate = (
        f" Connection rate: {meta['rate_parallel']} client threads, each opening a stream, "
        f"echoing one byte and closing, back to back for {meta['rate_seconds']:g} s per chain "
        "and round."
        if meta.get("rate_seconds")
        else ""
    )
    return (
        f"{meta['size_mib']} MiB per transfer and direction, SHA-256 checked end to end; "
        f"{meta['rounds']} round(s), every chain measured in each round in an order rotated "
        "from round to round (interleaved); figures are medians over rounds (each round's "
        "value in brackets when there are several). Setup latency: "
        f"{meta['latency_count']} fresh streams per chain and round, one after the other, TCP "
        f"connect to the first echoed byte, p50 / p90 over all.{rate} CPU counts every process "
        "of the chain (sshd = its listener and session processes; worker = relay-worker "
        "itself, ssh = its ssh children), not the client or the sink."
    )


def summarize(meta: dict[str, Any], agg: dict[str, Any], failure: Optional[str]) -> str:
    out: list[str] = []
    out.append(f"# Relay vs the old chain in the namespace lab ({meta['mode']})\n")
    out.append(f"Command: `{meta['command']}`\n")
    if failure:
        out.append(f"**RUN FAILED: {failure}**\n")
    out.append(
        f"Date (UTC): {meta['started']}; host {meta['host']}: {meta['cpus']} CPUs "
        f"({meta['cpu_model']}), shared; load average before {meta['load_before']}, after "
        f"{meta.get('load_after', '-')}; kernel {meta['kernel']}; Python {meta['python']}; "
        f"{meta['openssh']}; {meta['dante']}; relay {meta['commit']}.\n"
    )
    out.append(method_note(meta) + "\n")
    if meta.get("direct_note"):
        out.append(f"_{meta['direct_note']}._\n")
    names = [n for n in meta["chains"] if n in agg]
    out.extend(primary_table(agg, names))
    ratios = ratio_table(agg, names)
    if ratios:
        out.append("\n" + RATIO_NOTE + "\n")
        out.extend(ratios)
    out.append("\n## Busiest process per transfer\n")
    out.extend(busiest_table(meta, agg, names))
    out.append("\n## Chains\n")
    out.extend(chain_lines(meta, names))
    out.append(
        f"\nRelays: shipped defaults but for the settings named above (exit allows only the "
        "sink); sshd per chain, LogLevel "
        f"DEBUG1 (to log the cipher); firewall idle timeout {meta['fw_idle_timeout']} s; "
        "`tcp_tw_reuse=1` in the outside namespace. Raw data, configs and per-process CPU "
        "in results.json; daemon logs in the work directory "
        f"`{meta['workdir']}`.\n"
    )
    return "\n".join(out)


def busiest_table(meta: dict[str, Any], agg: dict[str, Any], names: list[str]) -> list[str]:
    """Which process limited each transfer: near 100 % of a core is a bottleneck."""
    out = [
        "The chain's process with the most CPU during each transfer, in % of one core "
        f"(the machine has {meta['cpus']}); client and sink (same machine) for context. "
        "Near 100% = that process is the bottleneck; otherwise the cores are shared out.\n",
        "| chain | direction | busiest process: % of a core per round | client % | sink % |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        for d in ("down", "up"):
            a = agg[name].get(d)
            if not a:
                continue
            busiest = (
                "; ".join(
                    f"{b['role']} `{b['cmd'][:40]}` {b['core_pct']:.0f}" for b in a["busiest"]
                )
                or "-"
            )
            out.append(
                f"| {name} | {d} | {busiest} | {a['client_core_pct']:.0f} | "
                f"{a['sink_core_pct']:.0f} |"
            )
    return out


def chain_lines(meta: dict[str, Any], names: list[str]) -> list[str]:
    """One line per chain: its path, negotiated ciphers and anything the relay logged."""
    out = []
    for name in names:
        info = meta.get("chain_info", {}).get(name, {})
        ciphers = ", ".join(info.get("ciphers", [])) or "-"
        line = f"- **{name}**: {info.get('description', '')}; negotiated cipher(s): {ciphers}"
        if info.get("ssh_logins"):
            line += f"; SSH logins during the run: {info['ssh_logins']}"
            expected = WORKER_EXTRA.get(name, {}).get("ssh_connections", 1)
            if info["ssh_logins"] < expected:
                line += f" (**{expected} expected**: the figures may be of fewer connections)"
        events = {k: v for k, v in info.get("relay_events", {}).items() if v}
        if events:
            line += "; **worker logged " + ", ".join(f"{k} x{v}" for k, v in events.items())
            line += "** (see worker.log)"
        out.append(line)
    return out


# ----------------------------------------------------------------------------- main


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (res.stdout + res.stderr).strip().splitlines()
    return re.split(r"\s+Copyright|,", text[0])[0].rstrip(". ") if text else "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _commit() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    dirty = [
        line.split(maxsplit=1)[-1]
        for line in git("status", "--porcelain", "--", "relay").splitlines()
    ]
    return commit + (f"+dirty ({', '.join(dirty)})" if dirty else "")


def lab_meta(
    mode_name: str, params: dict[str, Any], names: list[str], command: str, workdir: Path
) -> dict[str, Any]:
    """What a reader needs to judge and repeat the lab figures: machine, versions, settings."""
    return {
        "mode": mode_name,
        "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssh": _version(["ssh", "-V"]),
        "dante": _version(["/usr/sbin/danted", "-v"]),
        "commit": _commit(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "size_mib": params["size_mib"],
        "rounds": params["rounds"],
        "latency_count": params["latency_count"],
        "rate_seconds": params.get("rate_seconds", 0),
        "rate_parallel": params.get("rate_parallel", 0),
        "fw_idle_timeout": params.get("fw_idle_timeout", 300),
        "chains": names,
        "workdir": str(workdir),
    }


def run_lab(
    names: list[str],
    params: dict[str, Any],
    command: str,
    mode_name: str = "full",
    workdir: Optional[Path] = None,
) -> dict[str, Any]:
    """Build the lab, set up ``names``, measure them in rotated rounds, tear it all down.

    Returns {"meta", "rounds", "medians"}; meta["failure"] says why a run stopped early (a
    transfer that failed its checksum, a chain that opened no stream). Needs root. The work
    directory (configs, daemon logs) is left in place: a new one under /tmp unless given."""
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="lab-chains-"))
    workdir.mkdir(parents=True, exist_ok=True)
    meta = lab_meta(mode_name, params, names, command, workdir)
    data: dict[str, Any] = {"meta": meta, "rounds": []}
    bench = Bench(workdir, int(params.get("fw_idle_timeout", 300)))
    failure: Optional[str] = None
    t0 = time.monotonic()
    log(f"namespace lab: work directory {workdir}")
    try:
        bench.start(names)
        meta["direct_note"] = bench.direct_note
        meta["chains"] = list(bench.chains)
        meta["chain_info"] = {
            n: {"description": c.description, "hops": c.hops, "configs": c.configs}
            for n, c in bench.chains.items()
        }
        try:
            bench.run(params, data)
        except BenchFailure as exc:
            failure = str(exc)
        for n, c in bench.chains.items():
            meta["chain_info"][n]["ciphers"] = bench.ciphers(c)
            meta["chain_info"][n]["ssh_logins"] = bench.ssh_logins(c)
            meta["chain_info"][n]["relay_events"] = bench.relay_events(c)
    finally:
        bench.close()
    meta["seconds"] = round(time.monotonic() - t0, 1)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["failure"] = failure
    data["medians"] = aggregate(data["rounds"], meta["chains"])
    return data


def write_lab(data: dict[str, Any], out_dir: Path) -> str:
    """results.json and summary.md of a lab run into out_dir; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(data, indent=1))
    summary = summarize(data["meta"], data["medians"], data["meta"]["failure"])
    (out_dir / "summary.md").write_text(summary)
    return summary


def parse_chains(text: str, with_direct: bool = True) -> list[str]:
    """A --chains value in the canonical order; ValueError names what is wrong."""
    if not text:
        return default_chains(with_direct)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_CHAINS]
    if unknown or not names:
        raise ValueError(f"unknown chain(s) {unknown}; choose from {', '.join(ALL_CHAINS)}")
    if TWO_SSH in names and not ssh_connections_supported():
        raise ValueError(
            f"{TWO_SSH} needs the worker option ssh_connections, which this tree's "
            "relay/config/schema.py does not have"
        )
    return [n for n in ALL_CHAINS if n in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 MiB transfers, 1 round, 20 latency samples, 2 s of connection rate",
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--size-mib", type=int, default=0, help="MiB per transfer (default 200, quick 32)"
    )
    parser.add_argument(
        "--latency-count",
        type=int,
        default=0,
        help="setup latency samples per chain and round (default 50, quick 20)",
    )
    parser.add_argument(
        "--rate-seconds",
        type=float,
        default=None,
        help="seconds of connection rate per chain and round (default 5, quick 2; 0 = skip)",
    )
    parser.add_argument(
        "--rate-parallel",
        type=int,
        default=0,
        help="concurrent client loops in the rate test (default 8, quick 4)",
    )
    parser.add_argument(
        "--chains",
        default="",
        help=f"comma list of {', '.join(ALL_CHAINS)} (default: all; {TWO_SSH} only when the "
        "worker has the option ssh_connections)",
    )
    parser.add_argument(
        "--fw-idle-timeout",
        type=int,
        default=300,
        help="seconds the lab firewall keeps an idle connection",
    )
    parser.add_argument("--out", default="", help="results directory")
    args = parser.parse_args()
    try:
        names = parse_chains(args.chains)
    except ValueError as exc:
        parser.error(str(exc))
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd, nftables, danted)", file=sys.stderr)
        return 2
    mode_name = "quick" if args.quick else "full"
    params = dict(MODES[mode_name])
    for key in ("rounds", "size_mib", "latency_count", "rate_parallel"):
        params[key] = getattr(args, key) or params[key]
    if args.rate_seconds is not None:
        params["rate_seconds"] = args.rate_seconds
    params["fw_idle_timeout"] = args.fw_idle_timeout

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = datetime.now(timezone.utc)
    out_dir = (
        Path(args.out)
        if args.out
        else RESULTS
        / (started.strftime("%Y%m%dT%H%M%SZ") + "-lab-chains" + ("-quick" if args.quick else ""))
    )
    command = (
        "cd "
        + shlex.quote(str(REPO))
        + " && "
        + shlex.join([".venv/bin/python", "-m", "bench.lab_chains", *sys.argv[1:]])
        + "  # as root"
    )
    data = run_lab(names, params, command, mode_name)
    print(write_lab(data, out_dir))
    failure = data["meta"]["failure"]
    log(f"results in {out_dir} ({data['meta']['seconds']:.0f} s)")
    if failure:
        log(f"FAILED: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

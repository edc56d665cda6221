"""The firewall lab: network namespaces + nftables modelling an HPC site that forgets idle TCP.

Topology (one veth pair per link, all addresses exist only inside the namespaces)::

    worker 192.0.2.2 --- 192.0.2.1 login 198.51.100.2 --- 198.51.100.1 fw
                                                         fw 203.0.113.1 --- 203.0.113.2 outside

The worker (compute node) can reach only the login node's subnet. The login node routes out via
the firewall, which only lets new TCP connections from the login side to ports 80/443 through and
gives every tracked TCP connection a short `established` timeout. Once a connection has been
idle longer than that, the firewall has forgotten it and (with nf_conntrack_tcp_loose=0) drops its
next packets as `ct state invalid`: silently, no RST, no FIN. That is the failure the relay must
survive, so the tests reproduce it for real instead of mocking it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.support.proc import pid_alive, terminate

__all__ = [
    "NSCLIENT",
    "PREFIX",
    "Lab",
    "LabError",
    "cleanup_stale_namespaces",
    "netns_works",
    "nsclient_argv",
]

PREFIX = "hr-"
NSCLIENT = Path(__file__).with_name("nsclient.py")
TABLE = "hrlab"
INVALID_COUNTER = "invalid_drops"
# Names of the veth ends; each lives in its own namespace, so short fixed names cannot collide.
FW_LOGIN_IF = "to-login"
_NAME_RE = re.compile(
    rf"^{re.escape(PREFIX)}(\d+)-([0-9a-f]+)-(worker|login|fw|outside|sw|w\d+|l\d+)$"
)


class LabError(RuntimeError):
    """Lab setup or a lab command failed; the message names the command and its stderr."""


def nsclient_argv(*args: str) -> list[str]:
    """argv running tests/support/nsclient.py with this interpreter (for Lab.spawn / Lab.run)."""
    return [sys.executable, str(NSCLIENT), *args]


def _sh(argv: Sequence[str], input: str | None = None, timeout: float = 30) -> str:
    """Run a setup command; raise LabError with the command line and stderr on failure."""
    try:
        res = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"command failed: {shlex.join(argv)}: {exc}") from exc
    if res.returncode != 0:
        raise LabError(
            f"command failed (rc={res.returncode}): {shlex.join(argv)}\n"
            f"stderr: {res.stderr.strip()}\nstdout: {res.stdout.strip()}"
        )
    return res.stdout


def _list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def cleanup_stale_namespaces(kill_processes: bool = False) -> list[str]:
    """Delete `hr-<pid>-<hex>-<role>` namespaces whose creating process no longer exists.

    Aborted runs (SIGKILL, a crashed CI job) cannot tear down; this keeps them from piling up.
    Namespaces of live creators (e.g. a parallel test run) are left alone. With
    kill_processes=True, processes still inside a stale namespace (necessarily started by that
    dead lab) are ended by pid first, so the namespace really goes away. Returns deleted names.
    """
    deleted = []
    for ns in _list_netns():
        m = _NAME_RE.match(ns)
        if not m or pid_alive(int(m.group(1))):
            continue
        if kill_processes:
            terminate(pids=_netns_pids(ns))
        res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if res.returncode == 0:
            deleted.append(ns)
    return deleted


def netns_works() -> str | None:
    """None if this process can create/use/delete network namespaces, else why not."""
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): network namespaces and nftables need root"
    ns = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-worker"
    try:
        _sh(["ip", "netns", "add", ns])
        try:
            _sh(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            _sh(["ip", "netns", "exec", ns, "nft", "list", "ruleset"])
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    except LabError as exc:
        return f"`ip netns` / nft not usable: {exc}"
    return None


def _ruleset(idle_timeout: int) -> str:
    """The firewall's nftables ruleset (see the module docstring for the why)."""
    return f"""\
table inet {TABLE} {{
    ct timeout idle_kill {{
        protocol tcp
        l3proto ip
        policy = {{ established: {idle_timeout} }}
    }}

    counter {INVALID_COUNTER} {{
    }}

    chain set_timeout {{
        # After conntrack (-200) has attached an entry, before it is confirmed (postrouting).
        type filter hook prerouting priority -150; policy accept;
        ct state new meta l4proto tcp ct timeout set "idle_kill"
    }}

    chain filter_forward {{
        type filter hook forward priority 0; policy drop;
        ct state invalid counter name "{INVALID_COUNTER}" drop
        ct state established,related accept
        iifname "{FW_LOGIN_IF}" tcp dport {{ 80, 443 }} ct state new accept
    }}
}}
"""


class Lab:
    """Four namespaces (worker, login, fw, outside) plus the processes a test ran in them."""

    worker_ip = "192.0.2.2"
    login_ip = "192.0.2.1"
    login_out_ip = "198.51.100.2"
    fw_login_ip = "198.51.100.1"
    fw_out_ip = "203.0.113.1"
    outside_ip = "203.0.113.2"

    def __init__(self, workdir: Path, idle_timeout: float = 4) -> None:
        """Only allocate names; use Lab.create() to build the network."""
        self.workdir = Path(workdir).resolve()
        self.idle_timeout = idle_timeout
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.worker = f"{self.name}-worker"
        self.login = f"{self.name}-login"
        self.fw = f"{self.name}-fw"
        self.outside = f"{self.name}-outside"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._logs: list[IO[Any]] = []
        self._closed = False

    @property
    def namespaces(self) -> tuple[str, str, str, str]:
        return (self.worker, self.login, self.fw, self.outside)

    # ----------------------------------------------------------------------------- building

    @classmethod
    def create(cls, workdir: Path, idle_timeout: float = 4) -> Lab:
        """Build the lab; on any failure tear down what was made and raise LabError."""
        if idle_timeout < 1:
            raise ValueError("idle_timeout must be >= 1 s (nftables timeouts are whole seconds)")
        cleanup_stale_namespaces()
        lab = cls(workdir, idle_timeout)
        lab.workdir.mkdir(parents=True, exist_ok=True)
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def _ns(self, ns: str, *argv: str) -> str:
        return _sh(["ip", "netns", "exec", ns, *argv])

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # Created directly inside the namespaces so nothing ever appears in the root namespace.
        link = ["ip", "link", "add", if_a, "netns", ns_a, "type", "veth"]
        _sh([*link, "peer", "name", if_b, "netns", ns_b])

    def _addr(self, ns: str, ifname: str, cidr: str) -> None:
        self._ns(ns, "ip", "addr", "add", cidr, "dev", ifname)
        self._ns(ns, "ip", "link", "set", ifname, "up")

    def _build(self) -> None:
        for ns in self.namespaces:
            _sh(["ip", "netns", "add", ns])
            self._created.append(ns)
            self._ns(ns, "ip", "link", "set", "lo", "up")
        self._veth(self.worker, "to-login", self.login, "to-worker")
        self._veth(self.login, "to-fw", self.fw, FW_LOGIN_IF)
        self._veth(self.fw, "to-outside", self.outside, "to-fw")
        self._addr(self.worker, "to-login", f"{self.worker_ip}/24")
        self._addr(self.login, "to-worker", f"{self.login_ip}/24")
        self._addr(self.login, "to-fw", f"{self.login_out_ip}/24")
        self._addr(self.fw, FW_LOGIN_IF, f"{self.fw_login_ip}/24")
        self._addr(self.fw, "to-outside", f"{self.fw_out_ip}/24")
        self._addr(self.outside, "to-fw", f"{self.outside_ip}/24")
        # Worker: no default route, it only knows its own /24 (the compute node has no way out).
        self._ns(self.login, "ip", "route", "add", "default", "via", self.fw_login_ip)
        self._ns(self.outside, "ip", "route", "add", "default", "via", self.fw_out_ip)
        self._ns(self.login, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        self._ns(self.fw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Ruleset first: it pulls in conntrack, and the conntrack sysctls only exist after that.
        rules = self.workdir / f"{self.name}-fw.nft"
        rules.write_text(_ruleset(math.ceil(self.idle_timeout)))
        self._ns(self.fw, "nft", "-f", str(rules))
        # Per-namespace, and a fresh namespace has tcp_loose=1, which would re-adopt a forgotten
        # connection's next packet as a new flow instead of dropping it as invalid.
        self._ns(self.fw, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        self._ns(self.fw, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=0")

    # ----------------------------------------------------------------------------- running

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `ip netns exec NS argv...` in the background; ended by close().

        stdout/stderr go to a log file in the workdir unless given. `ip netns exec` execs the
        command in place, so .pid is the command's own pid.
        """
        if self._closed:
            raise LabError("lab is closed")
        if "stdout" not in popen_kwargs or "stderr" not in popen_kwargs:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(argv[0]).name if argv else "proc")
            role = ns[len(self.name) + 1 :] if ns.startswith(self.name) else ns
            log_path = self.workdir / f"{role}-{len(self._procs)}-{stem}.log"
            log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
            self._logs.append(log)
            popen_kwargs.setdefault("stdout", log)
            popen_kwargs.setdefault("stderr", subprocess.STDOUT)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `ip netns exec NS argv...` to completion with captured text output."""
        full = ["ip", "netns", "exec", ns, *argv]
        res = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        if check and res.returncode != 0:
            raise LabError(
                f"command failed (rc={res.returncode}): {shlex.join(full)}\n"
                f"stderr: {res.stderr.strip()}\nstdout: {res.stdout.strip()}"
            )
        return res

    def wait_listening(
        self, ns: str, port: int, timeout: float = 10, proc: subprocess.Popen[Any] | None = None
    ) -> None:
        """Wait until something listens on TCP port inside ns (fail fast if proc died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise LabError(f"process {proc.args!r} exited with rc {proc.returncode}")
            out = self.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise LabError(f"nothing listening on tcp port {port} in {ns} after {timeout}s")

    def start_echo_server(self, ns: str, host: str, port: int) -> subprocess.Popen[Any]:
        """Start nsclient's TCP echo server in ns on host:port and wait until it listens."""
        proc = self.spawn(ns, nsclient_argv("echo-server", host, str(port)))
        self.wait_listening(ns, port, proc=proc)
        return proc

    def spawn_client(
        self, ns: str, host: str, port: int, *options: str, **popen_kwargs: Any
    ) -> subprocess.Popen[str]:
        """Start an nsclient `client` (options as in nsclient.py) with text stdout piped.

        With "--wait-stdin" stdin is a pipe: read the {"event": "first"} line from stdout, do
        something to the network, then write a line to stdin to let the client go on.
        """
        argv = nsclient_argv("client", host, str(port), *options)
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        popen_kwargs.setdefault("text", True)
        if "--wait-stdin" in options:
            popen_kwargs.setdefault("stdin", subprocess.PIPE)
        return self.spawn(ns, argv, **popen_kwargs)

    @staticmethod
    def client_result(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
        """Wait for an nsclient process and parse the JSON result on its last stdout line."""
        out, err = proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            raise LabError(f"nsclient printed nothing (rc={proc.returncode}); stderr: {err}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def tcp_connect(self, ns: str, host: str, port: int, timeout: float = 2) -> dict[str, Any]:
        """Try one TCP connect from ns; returns nsclient's {"connected": bool, "error": ...}."""
        res = self.run(
            ns,
            nsclient_argv("connect", host, str(port), "--timeout", str(timeout)),
            timeout=timeout + 30,
        )
        result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return result

    # ----------------------------------------------------------------------------- firewall

    def forget_connections(self, dport: int = 80) -> int:
        """Make the firewall forget live TCP flows to dport (a carrier black-holed mid-stream).

        Returns how many conntrack entries were deleted; 0 (not an error) when none matched.
        """
        argv = ["conntrack", "-D", "-p", "tcp", "--dport", str(dport)]
        res = self.run(self.fw, argv, check=False)
        text = res.stdout + res.stderr
        m = re.search(r"(\d+) flow entries have been deleted", text)
        if m:
            return int(m.group(1))
        if res.returncode != 0:
            raise LabError(f"conntrack -D failed (rc={res.returncode}): {text.strip()}")
        return 0

    def kill_sockets(self, ns: str, filter: str | Sequence[str]) -> int:
        """`ss -K FILTER` inside ns (e.g. "dst 203.0.113.2 dport = :80"): reset those sockets.

        Returns how many sockets ss reported as killed.
        """
        words = shlex.split(filter) if isinstance(filter, str) else list(filter)
        res = self.run(ns, ["ss", "-K", "-H", "-t", "-n", *words])
        return len([line for line in res.stdout.splitlines() if line.strip()])

    def invalid_drops(self) -> int:
        """Packets the firewall dropped as `ct state invalid` (i.e. of forgotten connections)."""
        res = self.run(self.fw, ["nft", "-j", "list", "counter", "inet", TABLE, INVALID_COUNTER])
        for item in json.loads(res.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"counter {INVALID_COUNTER} not found in: {res.stdout}")

    def conntrack_entries(self, dport: int | None = None) -> list[str]:
        """The firewall's current TCP conntrack entries (optionally only those to dport)."""
        argv = ["conntrack", "-L", "-p", "tcp"] + (["--dport", str(dport)] if dport else [])
        res = self.run(self.fw, argv, check=False)
        return [line for line in res.stdout.splitlines() if line.strip()]

    # ----------------------------------------------------------------------------- teardown

    def close(self) -> None:
        """End spawned processes by pid, then delete the namespaces; idempotent.

        Anything still running inside the lab's namespaces (e.g. an sshd started there with
        start_sshd and not stopped, or its session processes) was started by this test and
        would keep the namespace alive after `ip netns del`, so it is ended by pid too.
        """
        if self._closed:
            return
        self._closed = True
        try:
            terminate(popens=self._procs)
            leftovers = [pid for ns in self._created for pid in _netns_pids(ns)]
            if leftovers:
                terminate(pids=leftovers)
        finally:
            for log in self._logs:
                log.close()
            for proc in self._procs:
                for stream in (proc.stdout, proc.stderr, proc.stdin):
                    if stream is not None:
                        stream.close()
            for ns in reversed(self._created):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            self._created.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

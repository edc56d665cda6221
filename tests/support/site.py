"""A whole site for soak tests: many compute nodes, several login nodes, one idle-killing firewall.

Topology (every interface and address exists only inside the site's namespaces)::

    w0 10.20.0.11 --+                         +-- 10.20.0.1 l0 198.51.100.11 --+
    w1 10.20.0.12 --+-- sw: bridge "compute" -+                                +-- fw: bridge
    ...           --+   (worker ports         +-- 10.20.0.2 l1 198.51.100.12 --+   "to-login"
                         isolated)                                                198.51.100.1
    fw 203.0.113.1 --- outside: exits 203.0.113.11, .12, ...; sink 203.0.113.100

The compute nodes (w*) and the login nodes (l*) share one compute network, a Linux bridge in its
own namespace (sw) that has no address and no nftables. The worker ports of that bridge are
`isolated`, so at layer 2 a compute node exchanges frames only with the login nodes (not with
other compute nodes). A compute node has no default route, and the login nodes do not forward
(ip_forward=0) while nothing beyond them has a route to the compute network, so a compute node
reaches the login nodes' compute addresses and nothing else. Each login node has an uplink into
a second bridge in the firewall namespace (named like the Lab's login-side interface, so the
Lab's nftables ruleset applies as it is) and a default route via the firewall. The firewall
forwards to the outside namespace, which holds the exits' addresses and the sink's address on
one interface; the outside reaches the sink locally.

The firewall is the Lab's: only new TCP from the login side to ports 80/443 passes, tracked TCP
connections are forgotten after `idle_timeout` seconds of silence, and packets of a forgotten
connection are dropped (and counted) as `ct state invalid`.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.netns import (
    FW_LOGIN_IF,
    Lab,
    LabError,
    _ruleset,
    _sh,
    cleanup_stale_namespaces,
)

__all__ = ["Site"]

COMPUTE_NET = "10.20.0"  # /24: login nodes .1 .., compute nodes .11 ..
UPLINK_NET = "198.51.100"  # /24: firewall .1, login nodes' uplinks .11 ..
OUTSIDE_NET = "203.0.113"  # /24: firewall .1, exits .11 .., sink .100
MAX_WORKERS = 200
MAX_LOGINS = 9
MAX_EXITS = 80
# Interface names; each namespace has its own, so these short fixed names cannot collide.
COMPUTE_BR = "compute"  # the bridge in sw
COMPUTE_IF = "compute"  # a node's interface on the compute network
UPLINK_IF = "uplink"  # a login node's interface towards the firewall
FW_OUT_IF = "to-outside"
OUTSIDE_IF = "to-fw"


class Site:
    """Namespaces for workers, login nodes, a switch (sw), the firewall and the outside."""

    def __init__(
        self,
        workdir: Path,
        workers: int = 8,
        logins: int = 2,
        exits: int = 2,
        idle_timeout: float = 40,
    ) -> None:
        """Only allocate names and addresses; use Site.create() to build the network."""
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}")
        if not 1 <= logins <= MAX_LOGINS:
            raise ValueError(f"logins must be 1..{MAX_LOGINS}")
        if not 1 <= exits <= MAX_EXITS:
            raise ValueError(f"exits must be 1..{MAX_EXITS}")
        if idle_timeout < 1:
            raise ValueError("idle_timeout must be >= 1 s (nftables timeouts are whole seconds)")
        # The Lab object runs and ends the processes and deletes the namespaces; only its name,
        # fw and outside (same naming scheme) are used, its worker/login namespaces never exist.
        self._lab = Lab(workdir, idle_timeout)
        self.workdir = self._lab.workdir
        self.idle_timeout = idle_timeout
        self.name = self._lab.name
        self.workers = [f"{self.name}-w{i}" for i in range(workers)]
        self.logins = [f"{self.name}-l{i}" for i in range(logins)]
        self.sw = f"{self.name}-sw"
        self.fw = self._lab.fw
        self.outside = self._lab.outside
        self.worker_ips = [f"{COMPUTE_NET}.{11 + i}" for i in range(workers)]
        self.login_ips = [f"{COMPUTE_NET}.{1 + i}" for i in range(logins)]
        self.login_uplink_ips = [f"{UPLINK_NET}.{11 + i}" for i in range(logins)]
        self.fw_login_ip = f"{UPLINK_NET}.1"
        self.fw_out_ip = f"{OUTSIDE_NET}.1"
        self.exit_ips = [f"{OUTSIDE_NET}.{11 + i}" for i in range(exits)]
        self.sink_ip = f"{OUTSIDE_NET}.100"

    @property
    def namespaces(self) -> list[str]:
        return [*self.workers, *self.logins, self.sw, self.fw, self.outside]

    # ----------------------------------------------------------------------------- building

    @classmethod
    def create(
        cls,
        workdir: Path,
        workers: int = 8,
        logins: int = 2,
        exits: int = 2,
        idle_timeout: float = 40,
    ) -> Site:
        """Build the site; on any failure (or interrupt) delete what was made and re-raise."""
        site = cls(workdir, workers, logins, exits, idle_timeout)
        cleanup_stale_namespaces()
        site.workdir.mkdir(parents=True, exist_ok=True)
        try:
            site._build()
        except BaseException:
            site.close()
            raise
        return site

    def _build(self) -> None:
        # Registered before creation: deleting a name that never got created is harmless, and a
        # batch that fails halfway leaves no namespace behind.
        self._lab._created.extend(self.namespaces)
        root = [f"netns add {ns}" for ns in self.namespaces]
        root.append(f"link add name {COMPUTE_BR} netns {self.sw} type bridge")
        root.append(f"link add name {FW_LOGIN_IF} netns {self.fw} type bridge")
        for i, ns in enumerate(self.workers):
            root.append(_veth(self.sw, f"w{i}", ns, COMPUTE_IF))
        for i, ns in enumerate(self.logins):
            root.append(_veth(self.sw, f"l{i}", ns, COMPUTE_IF))
            root.append(_veth(self.fw, f"l{i}", ns, UPLINK_IF))
        root.append(_veth(self.fw, FW_OUT_IF, self.outside, OUTSIDE_IF))
        self._ip_batch("root", None, root)

        per_ns: dict[str, list[str]] = {ns: ["link set lo up"] for ns in self.namespaces}
        per_ns[self.sw].append(f"link set {COMPUTE_BR} up")
        for i, (ns, ip) in enumerate(zip(self.workers, self.worker_ips)):
            per_ns[self.sw] += [
                f"link set w{i} master {COMPUTE_BR}",
                f"link set w{i} type bridge_slave isolated on",
                f"link set w{i} up",
            ]
            per_ns[ns] += _up(COMPUTE_IF, f"{ip}/24")
        per_ns[self.fw] += _up(FW_LOGIN_IF, f"{self.fw_login_ip}/24")
        for i, (ns, ip, up_ip) in enumerate(
            zip(self.logins, self.login_ips, self.login_uplink_ips)
        ):
            per_ns[self.sw] += [f"link set l{i} master {COMPUTE_BR}", f"link set l{i} up"]
            per_ns[self.fw] += [f"link set l{i} master {FW_LOGIN_IF}", f"link set l{i} up"]
            per_ns[ns] += _up(COMPUTE_IF, f"{ip}/24") + _up(UPLINK_IF, f"{up_ip}/24")
            per_ns[ns].append(f"route add default via {self.fw_login_ip}")
        per_ns[self.fw] += _up(FW_OUT_IF, f"{self.fw_out_ip}/24")
        for ip in [*self.exit_ips, self.sink_ip]:
            per_ns[self.outside].append(f"addr add {ip}/24 dev {OUTSIDE_IF}")
        per_ns[self.outside] += [
            f"link set {OUTSIDE_IF} up",
            f"route add default via {self.fw_out_ip}",
        ]
        # ip_forward is inherited from the host's namespace, so set it everywhere. Bridged frames
        # must not go through the inet hooks (br_netfilter) in the bridges' namespaces.
        no_brnf = "net.bridge.bridge-nf-call-iptables=0"
        sysctls = {ns: ["net.ipv4.ip_forward=0"] for ns in self.namespaces}
        sysctls[self.fw] = ["net.ipv4.ip_forward=1", no_brnf]
        sysctls[self.sw].append(no_brnf)
        jobs = [
            self._ip_batch(ns[len(self.name) + 1 :], ns, lines, run=False)
            for ns, lines in per_ns.items()
        ]
        for ns, settings in sysctls.items():
            # -e: the bridge key only exists where br_netfilter is loaded
            jobs.append(["ip", "netns", "exec", ns, "sysctl", "-qwe", *settings])
        _run_parallel(jobs)

        # Ruleset first: it pulls in conntrack, and the conntrack sysctls only exist after that.
        rules = self.workdir / f"{self.name}-fw.nft"
        rules.write_text(_ruleset(math.ceil(self.idle_timeout)))
        _sh(["ip", "netns", "exec", self.fw, "nft", "-f", str(rules)])
        # A fresh namespace has tcp_loose=1, which would re-adopt a forgotten connection's next
        # packet as a new flow instead of dropping it as invalid.
        loose = "net.netfilter.nf_conntrack_tcp_loose=0"
        liberal = "net.netfilter.nf_conntrack_tcp_be_liberal=0"
        _sh(["ip", "netns", "exec", self.fw, "sysctl", "-qw", loose, liberal])

    def _ip_batch(
        self, role: str, ns: str | None, lines: Sequence[str], run: bool = True
    ) -> list[str]:
        """Write an `ip -b` file to the workdir; run it (in ns) now, or return its argv."""
        path = self.workdir / f"{self.name}-{role}.ip"
        path.write_text("".join(f"{line}\n" for line in lines))
        argv = ["ip", *(["-n", ns] if ns else []), "-b", str(path)]
        if run:
            _sh(argv)
        return argv

    # ----------------------------------------------------------------------------- running

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `ip netns exec NS argv...` in the background; ended by close().

        stdout/stderr go to a log file in the workdir unless given; .pid is the command's pid.
        """
        return self._lab.spawn(ns, argv, **popen_kwargs)

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `ip netns exec NS argv...` to completion with captured text output."""
        return self._lab.run(ns, argv, check=check, timeout=timeout, input=input)

    def wait_listening(
        self, ns: str, port: int, timeout: float = 15, proc: subprocess.Popen[Any] | None = None
    ) -> None:
        """Wait until something listens on TCP port inside ns (fail fast if proc died)."""
        self._lab.wait_listening(ns, port, timeout=timeout, proc=proc)

    def start_echo_server(self, ns: str, host: str, port: int) -> subprocess.Popen[Any]:
        """Start nsclient's TCP echo server in ns on host:port and wait until it listens."""
        return self._lab.start_echo_server(ns, host, port)

    def tcp_connect(self, ns: str, host: str, port: int, timeout: float = 2) -> dict[str, Any]:
        """Try one TCP connect from ns; returns nsclient's {"connected": bool, "error": ...}."""
        return self._lab.tcp_connect(ns, host, port, timeout=timeout)

    def spawn_client(
        self, ns: str, host: str, port: int, *options: str, **popen_kwargs: Any
    ) -> subprocess.Popen[str]:
        """Start an nsclient `client` in ns (see Lab.spawn_client); result via client_result."""
        return self._lab.spawn_client(ns, host, port, *options, **popen_kwargs)

    client_result = staticmethod(Lab.client_result)

    def kill_sockets(self, ns: str, filter: str | Sequence[str]) -> int:
        """`ss -K FILTER` inside ns (e.g. "dport = :80"): reset those sockets; how many."""
        return self._lab.kill_sockets(ns, filter)

    # ----------------------------------------------------------------------------- firewall

    def forget_connections(self, dport: int | None = None) -> int:
        """Make the firewall forget live TCP flows (to dport, or all): the carriers are
        black-holed, the firewall drops their next packets as invalid.

        Returns how many conntrack entries were deleted; 0 (not an error) when none matched.
        """
        argv = ["conntrack", "-D", "-p", "tcp"] + ([] if dport is None else ["--dport", str(dport)])
        res = self.run(self.fw, argv, check=False)
        text = res.stdout + res.stderr
        m = re.search(r"(\d+) flow entries have been deleted", text)
        if m:
            return int(m.group(1))
        if res.returncode != 0:
            raise LabError(f"conntrack -D failed (rc={res.returncode}): {text.strip()}")
        return 0

    def conntrack_count(self, dport: int | None = None) -> int:
        """How many TCP connections (to dport, or all) the firewall tracks right now."""
        return len(self._lab.conntrack_entries(dport))

    def invalid_drops(self) -> int:
        """Packets the firewall dropped as `ct state invalid` (i.e. of forgotten connections)."""
        return self._lab.invalid_drops()

    # ----------------------------------------------------------------------------- teardown

    def close(self) -> None:
        """End spawned processes (and anything left in the namespaces) by pid, then delete
        every namespace of the site; idempotent."""
        self._lab.close()

    def __enter__(self) -> Site:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> str:
    """`ip -b` line for a veth pair created directly inside two namespaces."""
    return f"link add name {if_a} netns {ns_a} type veth peer name {if_b} netns {ns_b}"


def _up(ifname: str, cidr: str) -> list[str]:
    return [f"addr add {cidr} dev {ifname}", f"link set {ifname} up"]


def _run_parallel(jobs: Sequence[list[str]], timeout: float = 30) -> None:
    """Run independent setup commands at once; raise LabError naming the first that failed."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for argv in jobs:
            procs.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = [proc.communicate(timeout=timeout) for proc in procs]
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"setup command failed: {exc}") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, argv, (out, err) in zip(procs, jobs, results):
        if proc.returncode != 0:
            raise LabError(
                f"command failed (rc={proc.returncode}): {shlex.join(argv)}\n"
                f"stderr: {err.strip()}\nstdout: {out.strip()}"
            )

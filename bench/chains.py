"""Set up, on loopback, every chain the bench compares, from the real packaged programs.

- ``direct``: the client talks to the sink itself.
- ``old-chain`` / ``old-chain-gcm``: proxychains4 -> ``ssh -D`` -> OpenSSH sshd -> danted ->
  sink; proxychains chains the two SOCKS5 hops as in the prototype (CONNECT to dante through
  the ssh -D tunnel, then SOCKS5 to dante). ``-gcm`` adds ``-c aes128-gcm@openssh.com``.
- ``relay``: proxychains4 -> relay-worker -> OpenSSH sshd -> relay-exit -> sink, the daemons
  started from their console scripts with TOML configs, as an operator runs them.
- ``pproxy``: proxychains4 -> pproxy (SOCKS5 in, asyncssh to sshd) -> sshd -> pproxy (SOCKS5
  server) -> sink, the other pure-Python peer.

Each chain gets its own sshd (so its per-connection processes are its own) and its own exit.
For the WAN figures each chain also has a variant whose login -> exit leg goes through a
delay forwarder (a second proxychains config for the old chains, a second worker / pproxy for
the others); the destination leg goes through another forwarder in front of the sink.
Every process started here is ended by pid in ``Bench.close``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bench.common import free_port
from tests.support.proc import descendants, terminate
from tests.support.relays import wait_port, write_config, write_private
from tests.support.sshd import Sshd, start_sshd

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
KEY_ID = "bench-1"
SECRET = "bench-secret-0123456789abcdef0123456789"
SOCKS_USER, SOCKS_PASSWORD = "glidein", "bench-local-pass"
GCM = "aes128-gcm@openssh.com"

START_TIMEOUT = 20.0
"""Seconds a process gets to listen on its port (many start at once on two cores)."""

WAN_LOGIN_EXIT_MS = 5.0
WAN_EXIT_DEST_MS = 10.0


@dataclass
class Chain:
    """One chain, ready to carry connections."""

    name: str
    description: str
    roles: dict[str, int] = field(default_factory=dict)  # role -> root pid (tree counted)
    proxychains: Optional[Path] = None  # None = the client connects directly
    proxychains_wan: Optional[Path] = None
    socks_port: int = 0  # first SOCKS5 hop, for the idle client
    socks_auth: Optional[str] = None
    via_port: int = 0  # second SOCKS5 hop (old chain: dante)
    exit_port: int = 0  # the exit (dante, relay-exit, pproxy) as dialled from the login node
    sshd: Optional[Sshd] = None
    pythonpath: Optional[str] = None  # relay variants: where their relay package is

    def roots(self) -> list[int]:
        return list(self.roles.values())

    def wrap(self, argv: list[str], wan: bool = False) -> list[str]:
        conf = self.proxychains_wan if wan else self.proxychains
        return argv if conf is None else ["proxychains4", "-q", "-f", str(conf), *argv]


class Bench:
    """Owns the work directory, the sink, the forwarders, every chain and every process."""

    def __init__(
        self,
        workdir: Path,
        relay_pythonpath: Optional[str] = None,
        worker_config: Optional[dict[str, Any]] = None,
        exit_config: Optional[dict[str, Any]] = None,
    ) -> None:
        self.workdir = workdir
        self.worker_config = worker_config or {}
        self.exit_config = exit_config or {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.sshds: list[Sshd] = []
        self.relay_env = dict(os.environ)
        self.relay_env["PYTHONPATH"] = relay_pythonpath or str(REPO)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.chains: dict[str, Chain] = {}
        self.bulk_port = free_port()
        self.echo_port = free_port()
        self.wan_echo_port = 0
        self.sink_pid = 0
        self.client_key: Optional[Path] = None

    # -- processes ------------------------------------------------------------------------
    def spawn(
        self, name: str, argv: list[str], env: Optional[dict[str, str]] = None, port: int = 0
    ) -> subprocess.Popen[Any]:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env or self.env,
            cwd=self.workdir,
        )
        self.procs.append(proc)
        if port:
            wait_port(port, proc, log, timeout=START_TIMEOUT)
        return proc

    def close(self) -> None:
        pids: list[int] = []
        for proc in self.procs:
            if proc.poll() is None:
                pids.extend(descendants(proc.pid))
        terminate(pids=pids, popens=self.procs)
        for sshd in self.sshds:
            sshd.stop()

    def sshd(self, name: str) -> Sshd:
        server = start_sshd(
            self.workdir / name,
            extra_config={"LogLevel": "INFO", "MaxStartups": "1000:30:2000"},
            client_key=self.client_key,
        )
        self.client_key = server.client_key
        self.sshds.append(server)
        return server

    # -- the destination and the WAN ----------------------------------------------------
    def start_sink(self) -> None:
        proc = self.spawn(
            "sink",
            [
                sys.executable,
                "-m",
                "bench.sink",
                "--bulk-port",
                str(self.bulk_port),
                "--echo-port",
                str(self.echo_port),
            ],
            port=self.echo_port,
        )
        wait_port(self.bulk_port, proc, timeout=START_TIMEOUT)
        self.sink_pid = proc.pid

    def start_forwarders(self, exits: dict[str, int]) -> dict[str, int]:
        """One process: the exit -> destination leg (to the echo sink) and one login -> exit
        leg per chain. Returns chain name -> forwarder port in front of its exit."""
        self.wan_echo_port = free_port()
        routes = [f"{self.wan_echo_port}:127.0.0.1:{self.echo_port}:{WAN_EXIT_DEST_MS}"]
        fronts = {}
        for name, port in exits.items():
            fronts[name] = free_port()
            routes.append(f"{fronts[name]}:127.0.0.1:{port}:{WAN_LOGIN_EXIT_MS}")
        argv = [sys.executable, "-m", "bench.delay"]
        for r in routes:
            argv += ["--route", r]
        self.spawn("delay", argv, port=self.wan_echo_port)
        return fronts

    # -- chains ---------------------------------------------------------------------------
    def add_direct(self) -> Chain:
        chain = Chain("direct", "client -> sink (no relay; the ceiling)")
        self.chains[chain.name] = chain
        return chain

    def _proxychains_conf(self, name: str, hops: list[str]) -> Path:
        path = self.workdir / f"{name}.proxychains.conf"
        path.write_text(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
            "[ProxyList]\n" + "".join(h + "\n" for h in hops)
        )
        return path

    def start_dante(self, name: str, external: str) -> tuple[subprocess.Popen[Any], int]:
        """danted binds its outgoing sockets to ``external`` before connecting, so it cannot
        reuse ports in TIME_WAIT; each dante gets its own loopback address so that the other
        chains' closed connections (tens of thousands in the rate test) do not use up its
        ephemeral ports."""
        port = free_port()
        conf = self.workdir / f"{name}-danted.conf"
        conf.write_text(
            f"logoutput: {self.workdir / (name + '-danted.log')}\n"
            f"internal: 127.0.0.1 port = {port}\nexternal: {external}\n"
            "clientmethod: none\nsocksmethod: none\n"
            "user.privileged: root\nuser.unprivileged: nobody\n"
            "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
            "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        )
        proc = self.spawn(f"{name}-danted", ["/usr/sbin/danted", "-f", str(conf)], port=port)
        return proc, port

    def add_old_chain(self, name: str, cipher: Optional[str], external: str) -> Chain:
        sshd = self.sshd(f"{name}-sshd")
        dante, dante_port = self.start_dante(name, external)
        socks = free_port()
        options = ["-N", "-D", f"127.0.0.1:{socks}", "-o", "ExitOnForwardFailure=yes"]
        if cipher:
            options += ["-c", cipher]
        ssh = self.spawn(f"{name}-ssh", sshd.ssh_argv(options=options), port=socks)
        desc = "proxychains4 -> ssh -D -> sshd -> danted -> sink"
        if cipher:
            desc += f" (ssh -c {cipher})"
        else:
            desc += " (OpenSSH default cipher, chacha20-poly1305)"
        chain = Chain(name, desc, roles={"ssh": ssh.pid, "sshd": sshd.pid, "danted": dante.pid})
        chain.proxychains = self._proxychains_conf(
            name, [f"socks5 127.0.0.1 {socks}", f"socks5 127.0.0.1 {dante_port}"]
        )
        chain.socks_port = socks
        chain.via_port = dante_port
        chain.exit_port = dante_port
        self.chains[name] = chain
        return chain

    def _relay_env(self, pythonpath: Optional[str]) -> dict[str, str]:
        if pythonpath is None:
            return self.relay_env
        env = dict(self.relay_env)
        env["PYTHONPATH"] = pythonpath
        return env

    def _relay_worker(
        self, name: str, sshd: Sshd, exit_port: int, pythonpath: Optional[str] = None
    ) -> tuple[Any, int]:
        d = self.workdir / name
        d.mkdir(exist_ok=True)
        socks = free_port()
        auth = write_private(d / "socks.auth", f"{SOCKS_USER}:{SOCKS_PASSWORD}\n")
        config = write_config(
            d / "worker.toml",
            "worker",
            {
                "socks": f"127.0.0.1:{socks}",
                "socks_auth": str(auth),
                "login": [f"{sshd.user}@127.0.0.1:{sshd.port}"],
                "ssh_key": str(sshd.client_key),
                "known_hosts": str(sshd.known_hosts),
                "exit": [f"127.0.0.1:{exit_port}"],
                "key_id": KEY_ID,
                "secret_file": str(write_private(d / "worker.secret", SECRET + "\n")),
                **self.worker_config,
            },
        )
        proc = self.spawn(
            name,
            [str(BIN / "relay-worker"), "--config", str(config)],
            env=self._relay_env(pythonpath),
            port=socks,
        )
        return proc, socks

    def add_relay(self, name: str = "relay", pythonpath: Optional[str] = None) -> Chain:
        """The relay chain; ``pythonpath`` runs another copy of the relay package (a variant
        measured next to the baseline in the same run)."""
        sshd = self.sshd(f"{name}-sshd")
        d = self.workdir / f"{name}-exit"
        d.mkdir(exist_ok=True)
        exit_port = free_port()
        config = write_config(
            d / "exit.toml",
            "exit",
            {
                "listen": f"127.0.0.1:{exit_port}",
                "keys": str(write_private(d / "exit.keys", f"{KEY_ID} {SECRET}\n")),
                "allow": ["127.0.0.1/32:*"],
                "max_streams": 50000,
                "max_streams_per_key": 50000,
                **self.exit_config,
            },
        )
        exit_proc = self.spawn(
            f"{name}-exit",
            [str(BIN / "relay-exit"), "--config", str(config)],
            env=self._relay_env(pythonpath),
            port=exit_port,
        )
        worker, socks = self._relay_worker(f"{name}-worker", sshd, exit_port, pythonpath)

        chain = Chain(
            name,
            "proxychains4 -> relay-worker -> sshd -> relay-exit -> sink",
            roles={"relay-worker": worker.pid, "sshd": sshd.pid, "relay-exit": exit_proc.pid},
        )
        if pythonpath:
            chain.description += f" (variant: relay package from {pythonpath})"
        chain.pythonpath = pythonpath
        auth = f"{SOCKS_USER}:{SOCKS_PASSWORD}"
        chain.proxychains = self._proxychains_conf(
            name, [f"socks5 127.0.0.1 {socks} {SOCKS_USER} {SOCKS_PASSWORD}"]
        )
        chain.socks_port, chain.socks_auth = socks, auth
        chain.exit_port, chain.sshd = exit_port, sshd
        self.chains[name] = chain
        return chain

    def add_pproxy(self, name: str = "pproxy") -> Chain:
        sshd = self.sshd(f"{name}-sshd")
        exit_port = free_port()
        exit_proc = self.spawn(
            f"{name}-exit",
            [sys.executable, "-m", "bench.pproxy_run", "-l", f"socks5://127.0.0.1:{exit_port}"],
            port=exit_port,
        )
        local, socks = self._pproxy_local(f"{name}-local", sshd, exit_port)
        chain = Chain(
            name,
            "proxychains4 -> pproxy (asyncssh) -> sshd -> pproxy -> sink",
            roles={"pproxy-local": local.pid, "sshd": sshd.pid, "pproxy-exit": exit_proc.pid},
        )
        chain.proxychains = self._proxychains_conf(name, [f"socks5 127.0.0.1 {socks}"])
        chain.socks_port = socks
        chain.exit_port, chain.sshd = exit_port, sshd
        self.chains[name] = chain
        return chain

    def _pproxy_local(self, name: str, sshd: Sshd, exit_port: int) -> tuple[Any, int]:
        socks = free_port()
        remote = (
            f"ssh://127.0.0.1:{sshd.port}#{sshd.user}::{sshd.client_key}"
            f"__socks5://127.0.0.1:{exit_port}"
        )
        proc = self.spawn(
            name,
            [
                sys.executable,
                "-m",
                "bench.pproxy_run",
                "-l",
                f"socks5://127.0.0.1:{socks}",
                "-r",
                remote,
            ],
            port=socks,
        )
        return proc, socks

    # -- WAN variants ---------------------------------------------------------------------
    def add_wan(self) -> None:
        """Forwarders, and for each chain the variant that crosses them."""
        exits = {name: c.exit_port for name, c in self.chains.items() if c.exit_port}
        fronts = self.start_forwarders(exits)
        for name, chain in self.chains.items():
            if name.startswith("old-chain"):
                chain.proxychains_wan = self._proxychains_conf(
                    name + "-wan",
                    [f"socks5 127.0.0.1 {chain.socks_port}", f"socks5 127.0.0.1 {fronts[name]}"],
                )
            elif name.startswith("relay") and chain.sshd is not None:
                _, socks = self._relay_worker(
                    f"{name}-wan-worker", chain.sshd, fronts[name], chain.pythonpath
                )
                chain.proxychains_wan = self._proxychains_conf(
                    name + "-wan", [f"socks5 127.0.0.1 {socks} {SOCKS_USER} {SOCKS_PASSWORD}"]
                )
            elif name == "pproxy" and chain.sshd is not None:
                _, socks = self._pproxy_local("pproxy-wan-local", chain.sshd, fronts[name])
                chain.proxychains_wan = self._proxychains_conf(
                    name + "-wan", [f"socks5 127.0.0.1 {socks}"]
                )

"""A real OpenSSH sshd as a throwaway "login node".

The relay's whole job is to survive what real sshd does (forwarding refusals, restarts, dead
carriers), so tests talk to /usr/sbin/sshd rather than an in-process fake. Each instance gets
its own host key, authorized_keys and known_hosts in a work directory, so nothing touches
~/.ssh or /etc/ssh.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.support.proc import descendants, terminate

SSHD = "/usr/sbin/sshd"  # sshd re-execs itself and so insists on an absolute path
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0

__all__ = ["Sshd", "SshdError", "openssh_version", "start_sshd"]


class SshdError(RuntimeError):
    """sshd could not be set up or did not come up; the message carries the log tail."""


class _PortBusy(SshdError):
    """The picked port was taken between choosing and binding it (retryable)."""


def openssh_version() -> tuple[int, int]:
    """(major, minor) of the installed OpenSSH, to gate options newer releases need."""
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _keygen(path: Path, comment: str) -> None:
    """Create an unencrypted ed25519 key pair (path and path.pub, private part 0600)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    path.chmod(0o600)


def _public_key(private: Path) -> str:
    """Public key line for a private key: its .pub file when present, else derived."""
    pub = private.with_name(private.name + ".pub")
    if pub.exists():
        return pub.read_text().strip()
    out = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def _netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _free_port(host: str, netns: str | None) -> int:
    """Ask the kernel (inside netns when given) for a currently free TCP port on host."""
    family = "socket.AF_INET6" if ":" in host else "socket.AF_INET"
    if netns is None:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    code = (
        f"import socket; s = socket.socket({family}); s.bind(({host!r}, 0)); "
        "print(s.getsockname()[1])"
    )
    out = subprocess.run(
        [*_netns_prefix(netns), sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout.strip())


def _accepts(host: str, port: int, netns: str | None) -> bool:
    """True when a TCP connect to host:port succeeds (run inside netns when given)."""
    if netns is None:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.5).close()"
    res = subprocess.run(
        [*_netns_prefix(netns), sys.executable, "-c", code],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return res.returncode == 0


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Sshd:
    """A running sshd plus everything a client needs to log in to it strictly."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    host_key_pub: str
    pid: int
    workdir: Path
    netns: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _log_fh: IO[bytes] | None = field(default=None, repr=False, compare=False)
    _orphans: list[int] = field(default_factory=list, repr=False, compare=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of sshd's log, for assertion and error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def ssh_options(self) -> list[str]:
        """ssh(1) options for a hermetic, strict, non-interactive login to this server."""
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(self.port),
        ]

    def ssh_argv(self, *command: str, options: Sequence[str] = ()) -> list[str]:
        """Full ssh command line running command on this server (extra options, e.g. -W, go
        before the destination; run it via Lab.run/spawn to start it inside a namespace)."""
        return ["ssh", *self.ssh_options(), *options, f"{self.user}@{self.host}", *command]

    def _launch(self) -> None:
        """Start sshd with the written config and wait until its port accepts connections."""
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [*_netns_prefix(self.netns), SSHD, "-D", "-e", "-f", str(self.config_path)]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT
        )
        # `ip netns exec` execs sshd in place, so this is sshd's own pid.
        self.pid = self._proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        marker = f"Server listening on {self.host} port {self.port}"
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                log = self._log_since(offset)
                self._close_log()
                self._proc = None
                if "Address already in use" in log:
                    raise _PortBusy(f"sshd port {self.port} busy:\n{log}")
                raise SshdError(
                    f"sshd (pid {self.pid}) exited with rc {rc}; log tail:\n{self.log_tail()}"
                )
            if marker in self._log_since(offset) and _accepts(self.host, self.port, self.netns):
                return
            time.sleep(0.05)
        self.stop()
        raise SshdError(
            f"sshd on {self.host}:{self.port} (netns={self.netns}) not accepting after "
            f"{START_TIMEOUT:.0f}s; log tail:\n{self.log_tail()}"
        )

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def session_pids(self) -> list[int]:
        """Pids of sshd's per-connection processes (and their children) right now."""
        return descendants(self._proc.pid) if self.running and self._proc else []

    def stop(self, kill_sessions: bool = True) -> None:
        """SIGTERM sshd by pid, wait, SIGKILL if needed; idempotent.

        sshd's listener does not end established sessions when it exits, so by default their
        processes are ended too (they were started by this sshd, hence by the test). With
        kill_sessions=False they live on like after a real `systemctl restart sshd`, and are
        remembered so a later stop() still ends them.
        """
        proc = self._proc
        tree = descendants(proc.pid) if proc is not None else []
        if kill_sessions:
            terminate(pids=[*tree, *self._orphans], popens=[proc] if proc else [])
            self._orphans = []
        else:
            terminate(popens=[proc] if proc else [])
            self._orphans.extend(tree)
        self._proc = None
        self._close_log()

    def restart(self, kill_sessions: bool = True) -> None:
        """stop() then start again on the same address, port, keys and config."""
        self.stop(kill_sessions=kill_sessions)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._launch()
                return
            except _PortBusy:
                # Sessions kept alive do not hold the listening socket, but be patient anyway.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _config_text(host: str, port: int, workdir: Path, extra_config: dict[str, str] | None) -> str:
    options: dict[str, str] = {
        "ListenAddress": _listen_address(host, port),
        "HostKey": str(workdir / "ssh_host_ed25519_key"),
        "AuthorizedKeysFile": str(workdir / "authorized_keys"),
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "UsePAM": "no",
        "StrictModes": "no",
        "PermitRootLogin": "prohibit-password",
        "AllowTcpForwarding": "yes",
        "PermitOpen": "any",
        "PidFile": "none",
        "LogLevel": "VERBOSE",
        "MaxStartups": "100:30:200",
        "MaxSessions": "100",
        "Subsystem": "sftp internal-sftp",
    }
    if openssh_version() >= (9, 8):
        # Newer sshd penalises sources with failed/aborted logins; tests reconnect a lot.
        options["PerSourcePenalties"] = "no"
    for key, value in (extra_config or {}).items():
        # sshd keeps the first occurrence of a keyword, so an override must replace it.
        for existing in [k for k in options if k.lower() == key.lower()]:
            del options[existing]
        options[key] = value
    return "".join(f"{k} {v}\n" for k, v in options.items())


def start_sshd(
    workdir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    netns: str | None = None,
    extra_config: dict[str, str] | None = None,
    client_key: Path | None = None,
) -> Sshd:
    """Start sshd on host:port (port 0 = pick a free one), optionally inside netns.

    Returns once the port accepts TCP connections; raises SshdError with the log tail otherwise.
    Pass client_key to authorise one existing key on several servers.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = workdir / "ssh_host_ed25519_key"
    if not host_key.exists():
        _keygen(host_key, "hrlab-host")
    if client_key is None:
        client_key = workdir / "client_ed25519"
        if not client_key.exists():
            _keygen(client_key, "hrlab-client")
    client_key = Path(client_key).resolve()
    (workdir / "authorized_keys").write_text(_public_key(client_key) + "\n")
    host_key_pub = _public_key(host_key)
    user = pwd.getpwuid(os.getuid()).pw_name
    known_hosts = workdir / "known_hosts"

    attempts = 1 if port else 5
    for attempt in range(attempts):
        chosen = port or _free_port(host, netns)
        (workdir / "sshd_config").write_text(_config_text(host, chosen, workdir, extra_config))
        names = [f"[{host}]:{chosen}"]  # ssh looks up "[host]:port" for non-default ports
        if chosen == 22:
            names.insert(0, host)
        known_hosts.write_text("".join(f"{n} {host_key_pub}\n" for n in names))
        server = Sshd(
            host=host,
            port=chosen,
            user=user,
            client_key=client_key,
            known_hosts=known_hosts,
            host_key_pub=host_key_pub,
            pid=0,
            workdir=workdir,
            netns=netns,
        )
        try:
            server._launch()
            return server
        except _PortBusy:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")

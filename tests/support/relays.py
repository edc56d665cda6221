"""Start relay-exit and relay-worker as real processes (console scripts, TOML configs) inside
lab namespaces, the way an operator runs them; and the pieces every launcher of tests and
bench/ uses: private files, TOML configurations, waiting for a port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tests.support.netns import Lab
from tests.support.sshd import Sshd

BIN = Path(sys.executable).parent
KEY_ID = "worker-1"
SECRET = "lab-secret-0123456789abcdef0123456789"
SOCKS_USER, SOCKS_PASSWORD = "glidein", "lab-local-pass"


def write_private(path: Path, text: str) -> Path:
    """Write a file only its owner may read (0600), as the daemons require of secrets."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def toml_value(value: Any) -> str:
    """A Python value as a TOML value: booleans, numbers, strings, and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, table: str, values: dict[str, Any]) -> Path:
    """A TOML configuration file with one table (``[exit]``, ``[worker]``)."""
    lines = [f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[Any]
    config: Path
    log: Path
    ns: Optional[str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _log_tail(log: Optional[Path]) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- log ---\n" + log.read_text(errors="replace")[-3000:]


def wait_port(
    port: int,
    proc: Optional[subprocess.Popen[Any]] = None,
    log: Optional[Path] = None,
    *,
    timeout: float = 15.0,
    lab: Optional[Lab] = None,
    ns: Optional[str] = None,
) -> None:
    """Wait until something listens on TCP ``port``: inside namespace ``ns`` of ``lab``, or
    else on 127.0.0.1. Fails at once when ``proc`` exits, either way with the end of ``log``."""
    if lab is not None and ns is not None:
        try:
            lab.wait_listening(ns, port, timeout=timeout, proc=proc)
        except Exception as exc:
            raise RuntimeError(f"{exc}{_log_tail(log)}") from exc
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}{_log_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:g} s{_log_tail(log)}")


def start_exit(
    lab: Lab, workdir: Path, *, host: str = "203.0.113.2", port: int = 80,
    allow: tuple[str, ...] = ("203.0.113.0/24:*",), metrics_port: int = 9100, **extra: Any,
) -> Daemon:  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    keys = write_private(workdir / "exit.keys", f"{KEY_ID} {SECRET}\n")
    values: dict[str, Any] = {
        "listen": f"{host}:{port}",
        "keys": str(keys),
        "allow": list(allow),
        "metrics": f"{host}:{metrics_port}",
        "heartbeat": 1.0,
        "tcp_keepalive": 2,
        "log_level": "debug",
    }
    values.update(extra)
    config = write_config(workdir / f"exit-{port}.toml", "exit", values)
    log = workdir / f"exit-{port}.log"
    proc = lab.spawn(
        lab.outside, [str(BIN / "relay-exit"), "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_port(port, proc, log, lab=lab, ns=lab.outside)
    return Daemon(proc, config, log, lab.outside)


def start_worker(
    lab: Lab, workdir: Path, sshd: Sshd, *, exits: tuple[str, ...] = ("203.0.113.2:80",),
    logins: Optional[tuple[str, ...]] = None, socks_port: int = 1080, **extra: Any,
) -> Daemon:  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    secret = write_private(workdir / "worker.secret", SECRET + "\n")
    auth = write_private(workdir / "socks.auth", f"{SOCKS_USER}:{SOCKS_PASSWORD}\n")
    values: dict[str, Any] = {
        "socks": f"127.0.0.1:{socks_port}",
        "socks_auth": str(auth),
        "login": list(logins or (f"{sshd.user}@{sshd.host}:{sshd.port}",)),
        "ssh_key": str(sshd.client_key),
        "known_hosts": str(sshd.known_hosts),
        "exit": list(exits),
        "key_id": KEY_ID,
        "secret_file": str(secret),
        "heartbeat": 1.0,
        "log_level": "debug",
    }
    values.update(extra)
    config = write_config(workdir / f"worker-{socks_port}.toml", "worker", values)
    log = workdir / f"worker-{socks_port}.log"
    proc = lab.spawn(
        lab.worker, [str(BIN / "relay-worker"), "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_port(socks_port, proc, log, lab=lab, ns=lab.worker)
    return Daemon(proc, config, log, lab.worker)


def socks_url(port: int = 1080) -> str:
    return f"socks5://{SOCKS_USER}:{SOCKS_PASSWORD}@127.0.0.1:{port}"


def scrape(lab: Lab, ns: str, url: str) -> dict[str, float]:
    """Prometheus samples from a daemon's /metrics, read from inside its namespace."""
    text = lab.run(ns, ["curl", "-sS", "--max-time", "5", url]).stdout
    return parse_samples(text)


def parse_samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def fetch(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())

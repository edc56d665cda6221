"""Running glidein-wrapper in tests: a worker TOML for it, its argv, the stand-in's report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tests.support.relays import KEY_ID, SECRET, write_config
from tests.support.sshd import Sshd

BIN = Path(sys.executable).parent
WRAPPER = BIN / "glidein-wrapper"
STANDIN = Path(__file__).with_name("standin.py")


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def write_worker_config(
    workdir: Path, sshd: Sshd, exits: list[str], *, login: Optional[str] = None, **extra: Any
) -> Path:
    """A [worker] table for the wrapper: no socks_auth (the wrapper makes per-run credentials)."""
    workdir.mkdir(parents=True, exist_ok=True)
    secret = _private(workdir / "worker.secret", SECRET + "\n")
    values: dict[str, Any] = {
        "login": [login or f"{sshd.user}@{sshd.host}:{sshd.port}"],
        "ssh_key": str(sshd.client_key),
        "known_hosts": str(sshd.known_hosts),
        "exit": exits,
        "key_id": KEY_ID,
        "secret_file": str(secret),
        "heartbeat": 1.0,
        "connect_timeout": 5.0,
        "log_level": "debug",
    }
    values.update(extra)
    return write_config(workdir / "worker.toml", "worker", values)


def wrapper_argv(config: Path, *options: str, command: list[str]) -> list[str]:
    return [str(WRAPPER), "--config", str(config), *options, "--", *command]


def standin(report: Path, *actions: str) -> list[str]:
    """COMMAND running the stand-in glidein with this interpreter (dynamically linked)."""
    return [sys.executable, str(STANDIN), "--report", str(report), *actions]


def read_report(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def wait_file(path: Path, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Wait until ``path`` exists; fail early (with the wrapper's log) if ``proc`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"wrapper exited {proc.returncode} before {path.name} appeared")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")

"""Run every console script of an installed hpc-relay as a user would, from its venv.

Run with the venv's own interpreter (``VENV/bin/python scripts/smoke-installed.py``); only
the standard library and the installed package are used. Checks: ``relay version``,
``relay demo`` exits 0 with nothing on stderr, ``relay-exit --workers 2`` serves and stops
cleanly, ``relay-worker`` with a login node starts and stops cleanly under uvloop, and
``glidein-wrapper`` gates a command on a chain that is not there (exit 75, command not
started). Prints one line per check; exit status 1 on the first failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

BIN = Path(sys.executable).parent
SECRET = "0123456789abcdef0123456789abcdef"


class SmokeFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[str], what: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SmokeFailed(f"{what} did not stop within 40 s of SIGTERM") from None
    if code != 0:
        raise SmokeFailed(f"{what} exited {code} after SIGTERM")


def check_version() -> str:
    proc = run(["relay", "version"], 30)
    if proc.returncode != 0 or proc.stdout.strip() != version("hpc-relay"):
        raise SmokeFailed(f"relay version: exit {proc.returncode}: {proc.stdout}{proc.stderr}")
    return f"relay version: {proc.stdout.strip()}"


def check_demo() -> str:
    started = time.monotonic()
    proc = run(["relay", "demo"], 120)
    took = time.monotonic() - started
    if proc.returncode != 0 or "verdict: OK" not in proc.stdout:
        raise SmokeFailed(f"relay demo: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    if proc.stderr:
        raise SmokeFailed(f"relay demo wrote to stderr:\n{proc.stderr}")
    return f"relay demo: exit 0, nothing on stderr ({took:.1f} s)"


def check_exit_workers(tmp: Path) -> str:
    keys = private(tmp / "exit.keys", f"worker-1 {SECRET}\n")
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [str(BIN / "relay-exit"), "--workers", "2", "--keys", str(keys),
         "--listen", f"127.0.0.1:{port}", "--allow", "192.0.2.0/24:80",
         "--metrics", f"127.0.0.1:{metrics}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        page = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SmokeFailed(f"relay-exit --workers 2 exited {proc.returncode} at start")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                page = ""
            if all(f'relay_exit_worker_up{{worker="{i}"}} 1.0' in page for i in (0, 1)):
                break
            time.sleep(0.3)
        else:
            raise SmokeFailed(f"relay-exit --workers 2: both processes never up:\n{page}")
        # A SOCKS5 greeting offering only "no authentication": refused, but answered.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x05\x01\x00")
            answer = sock.recv(2)
        if answer != b"\x05\xff":
            raise SmokeFailed(f"relay-exit --workers 2 answered {answer!r} to a greeting")
        stop(proc, "relay-exit --workers 2")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "relay-exit --workers 2: both processes up, answered, stopped with 0 on SIGTERM"


def worker_files(tmp: Path) -> tuple[Path, int]:
    """A worker config whose login node and exit are closed ports."""
    import asyncssh

    key = tmp / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    key.chmod(0o600)
    (tmp / "known_hosts").write_text("")
    private(tmp / "worker.secret", SECRET + "\n")
    closed, socks = free_port(), free_port()
    (tmp / "worker.toml").write_text(
        "[worker]\n"
        f'socks = "127.0.0.1:{socks}"\n'
        "no_socks_auth = true\n"
        f'login = "relay@127.0.0.1:{closed}"\n'
        'ssh_key = "id_ed25519"\n'
        'known_hosts = "known_hosts"\n'
        f'exit = "127.0.0.1:{closed}"\n'
        'key_id = "worker-1"\n'
        'secret_file = "worker.secret"\n'
        'log_format = "json"\n'
    )
    return tmp / "worker.toml", socks


def check_worker(tmp: Path) -> str:
    config, _ = worker_files(tmp)
    proc = subprocess.Popen(
        [str(BIN / "relay-worker"), "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        while True:
            line = proc.stderr.readline()
            if not line:
                raise SmokeFailed("relay-worker ended at start:\n" + "".join(seen))
            seen.append(line)
            if '"listening"' in line:
                break
        loop = json.loads(seen[0])["msg"]
        stop(proc, "relay-worker")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return f"relay-worker with a login node: listened, stopped with 0 on SIGTERM ({loop})"


def check_wrapper(tmp: Path) -> str:
    config, _ = worker_files(tmp)
    marker = tmp / "started"
    proc = run(
        ["glidein-wrapper", "--config", str(config), "--ready-timeout", "3",
         "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        90,
    )  # fmt: skip
    if proc.returncode != 75 or marker.exists():
        raise SmokeFailed(
            f"glidein-wrapper without a chain: exit {proc.returncode}, command started: "
            f"{marker.exists()}\n{proc.stdout}{proc.stderr}"
        )
    return "glidein-wrapper without a chain: exit 75, command not started"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="relay-smoke-") as name:
        tmp = Path(name)
        checks = [
            check_version,
            check_demo,
            lambda: check_exit_workers(tmp),
            lambda: check_worker(tmp / "worker"),
            lambda: check_wrapper(tmp / "wrapper"),
        ]
        (tmp / "worker").mkdir()
        (tmp / "wrapper").mkdir()
        py = ".".join(map(str, sys.version_info[:3]))
        for check in checks:
            try:
                print(f"  ok (Python {py}, uid {os.getuid()}): {check()}", flush=True)
            except (SmokeFailed, subprocess.TimeoutExpired, OSError) as exc:
                print(f"  FAILED (Python {py}): {exc}", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

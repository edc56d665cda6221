"""The daemons as an operator starts them: exit codes and one-line config errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / command), *args], capture_output=True, text=True, timeout=30, check=False
    )


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return private(tmp_path / "exit.keys", "worker-1 0123456789abcdef0123456789abcdef\n")


def test_exit_config_error_names_key_and_file(tmp_path: Path, keys: Path) -> None:
    config = tmp_path / "exit.toml"
    config.write_text(f'[exit]\nkeys = "{keys}"\nallow = ["10.0.0.0/33"]\n')
    result = run("relay-exit", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "allow" in lines[0] and str(config) in lines[0] and "10.0.0.0/33" in lines[0]


def test_exit_malformed_rule_flag(keys: Path) -> None:
    result = run("relay-exit", "--keys", str(keys), "--allow", ".bad..domain:80")
    assert result.returncode == 2
    assert "--allow" in result.stderr


def test_exit_key_file_readable_by_others(tmp_path: Path) -> None:
    loose = private(tmp_path / "loose.keys", "worker-1 0123456789abcdef0123456789abcdef\n", 0o644)
    result = run("relay-exit", "--keys", str(loose), "--allow", "192.0.2.0/24:80")
    assert result.returncode == 2
    assert "--keys" in result.stderr and str(loose) in result.stderr
    assert "0123456789abcdef" not in result.stderr


def test_exit_unreadable_key_file(tmp_path: Path) -> None:
    result = run("relay-exit", "--keys", str(tmp_path / "missing.keys"))
    assert result.returncode == 2
    assert "--keys" in result.stderr and "missing.keys" in result.stderr


def test_worker_secret_file_readable_by_others(tmp_path: Path) -> None:
    secret = private(tmp_path / "secret", "s" * 32 + "\n", 0o640)
    result = run(
        "relay-worker", "--no-socks-auth", "--exit", "192.0.2.1:80", "--key-id", "w",
        "--secret-file", str(secret),
    )  # fmt: skip
    assert result.returncode == 2
    assert "--secret-file" in result.stderr and str(secret) in result.stderr


def test_worker_unknown_key_in_config_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[worker]\nno_socks_auth = true\nheartbaet = 5\n")
    result = run("relay-worker", "--config", str(config))
    assert result.returncode == 2
    assert "heartbaet" in result.stderr and str(config) in result.stderr


def test_worker_refuses_the_keep_warm_flag_it_no_longer_has() -> None:
    """--warm-carriers became --carriers (streams are multiplexed on long-lived carriers)."""
    result = run("relay-worker", "--no-socks-auth", "--upstream", "socks5://192.0.2.1:1080",
                 "--warm-carriers", "2")  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--warm-carriers" in lines[0], result.stderr
    help_text = run("relay-worker", "--help")
    assert help_text.returncode == 0 and "--carriers N" in help_text.stdout
    assert "warm" not in help_text.stdout


def test_relay_demo_runs_the_chain_and_exits_zero() -> None:
    """`relay demo` as a user types it (short timings): the relay's streams outlive the
    idle-killing middlebox and the command says so with status 0."""
    result = subprocess.run(
        [str(BIN / "relay"), "demo", "--idle", "2.5", "--blackhole-after", "1",
         "--heartbeat", "0.25", "--streams", "3", "--carriers", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: OK" in result.stdout
    assert "hpc-relay: 3 streams rode 2 carriers" in result.stdout
    assert "relay demo: could not run" not in result.stderr


def test_relay_command_usage() -> None:
    assert run("relay").returncode == 2
    assert run("relay", "nonsense").returncode == 2
    version = run("relay", "version")
    assert version.returncode == 0 and version.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_exit_starts_and_stops_cleanly_on_sigterm(tmp_path: Path, keys: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "relay-exit"), "--keys", str(keys), "--listen", f"127.0.0.1:{free_port()}",
         "--allow", "192.0.2.0/24:80", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while '"listening"' not in line and line:
            line = proc.stderr.readline()
        assert '"listening"' in line
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_worker_with_login_nodes_starts_and_stops_cleanly(tmp_path: Path, loop: str) -> None:
    """The SSH hop exists before the loop runs: it must not need one (Python 3.9, uvloop)."""
    import asyncssh

    key = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    key.chmod(0o600)
    (tmp_path / "known_hosts").write_text("")
    secret = private(tmp_path / "worker.secret", "0123456789abcdef0123456789abcdef\n")
    closed = free_port()
    proc = subprocess.Popen(
        [str(BIN / "relay-worker"), "--socks", f"127.0.0.1:{free_port()}", "--no-socks-auth",
         "--login", f"relay@127.0.0.1:{closed}", "--ssh-key", str(key),
         "--known-hosts", str(tmp_path / "known_hosts"), "--exit", f"127.0.0.1:{closed}",
         "--key-id", "worker-1", "--secret-file", str(secret), "--log-format", "json",
         *(["--no-uvloop"] if loop == "asyncio" else [])],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = [proc.stderr.readline()]
        while '"listening"' not in seen[-1] and seen[-1]:
            seen.append(proc.stderr.readline())
        assert '"listening"' in seen[-1], "".join(seen)
        if loop == "uvloop":
            assert "starting (uvloop)" in seen[0]
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

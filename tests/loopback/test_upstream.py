"""Migration mode: the worker relays through an existing plain SOCKS5 exit (dante), over the
same SSH login node, with python-socks as the upstream client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config.values import HostPort
from relay.worker.daemon import RelayWorker
from tests.loopback.test_cli import free_port
from tests.support.helpers import PASSWORD, USER, Servers, http_handler, sha256, worker_settings
from tests.support.sshd import Sshd


@pytest.fixture
def dante(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    config = tmp_path / "danted.conf"
    config.write_text(
        f"""logoutput: {tmp_path / "danted.log"}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
"""
    )
    proc = subprocess.Popen(
        ["/usr/sbin/danted", "-f", str(config), "-N", "1"], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import socket
        import time

        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (tmp_path / "danted.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "danted did not start"
            time.sleep(0.05)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("through_ssh", [True, False], ids=["via-login-node", "direct"])
async def test_curl_through_dante_upstream(sshd: Sshd, dante: int, tmp_path: Path,
                                           through_ssh: bool) -> None:  # fmt: skip
    payload = os.urandom(5 * 1024 * 1024)
    servers = Servers()
    http_port = await servers.start(http_handler(payload))
    overrides = {"upstream": HostPort("127.0.0.1", dante), "exit": ()}
    if not through_ssh:
        overrides["login"] = ()
    worker = RelayWorker(worker_settings(sshd, ("127.0.0.1", 1), **overrides))
    await worker.start()
    out = tmp_path / "payload"
    try:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--fail", "--max-time", "60",
            "--socks5-hostname", f"127.0.0.1:{worker.address[1]}",
            "--proxy-user", f"{USER}:{PASSWORD}",
            "-o", str(out), f"http://127.0.0.1:{http_port}/x",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
    finally:
        await worker.stop()
        await servers.close()
    assert proc.returncode == 0, err.decode()
    assert sha256(out.read_bytes()) == sha256(payload)
    ssh_connects = worker.metrics.registry.get_sample_value(
        "relay_ssh_connects_total",
        {"login": f"{sshd.user}@{sshd.host}:{sshd.port}", "result": "ok"},
    )
    assert (ssh_connects or 0) == (1 if through_ssh else 0)

"""relay-exit --workers 2 as real processes: sessions spread over both, and every carrier of a
session (its further carriers, and the ones that replace lost carriers) reaches the process
that holds it, whichever process the kernel gave the connection to; a resume that lands on
the process not owning the session is handed over and completes; a replayed HELLO is refused
whichever process reads it; SIGHUP and SIGTERM reach every process; /metrics shows them all
and a crashed process is restarted. Workers in this process, carriers direct on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.net.tlslink import TlsClient, client_context
from relay.proto import handoff as ho
from relay.proto import hello as hl
from relay.worker.daemon import RelayWorker
from tests.loopback.test_reload import Flow, free_port, open_flows
from tests.support.cutter import Cutter, _reset
from tests.support.helpers import (
    KEY_ID,
    SECRET,
    Servers,
    answer_after_eof_handler,
    echo_handler,
    worker_settings,
)
from tests.support.proc import pid_alive, terminate
from tests.support.relays import write_config
from tests.support.tlscerts import make_pki

BIN = Path(sys.executable).parent


@dataclass
class Group:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path
    config: Path
    tls: Optional[TlsClient] = None

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines(keepends=True):
            if line.startswith("{") and line.endswith("\n"):
                out.append(json.loads(line))
        return out

    def child_pids(self) -> dict[int, int]:
        """The latest pid of each worker index, from the supervisor's log."""
        pids: dict[int, int] = {}
        for line in self.lines():
            if line["msg"] == "worker started":
                pids[line["worker"]] = line["pid"]
        return pids

    def all_pids(self) -> list[int]:
        return [line["pid"] for line in self.lines() if line["msg"] == "worker started"]

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)

    def by_worker(self, name: str, **labels: str) -> list[float]:
        samples = self.samples()
        return [
            samples.get((name, tuple(sorted(dict(labels, worker=str(i)).items()))), 0.0)
            for i in range(2)
        ]


def _ours(pid: int, config: Path) -> bool:
    """Still one of this test's processes (pids are reused): its command line names our file."""
    try:
        return str(config) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


async def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture(params=["uvloop", "asyncio"])
async def group(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Group]:
    async with _running_group(request.param, tmp_path) as g:
        yield g


@pytest.fixture(params=["uvloop", "asyncio", "uvloop-tls", "asyncio-tls"])
async def any_group(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Group]:
    """Also with TLS: a process that reads a HELLO it does not own keeps the TLS and carries
    the plaintext to the owner."""
    async with _running_group(request.param, tmp_path) as g:
        yield g


@contextlib.asynccontextmanager
async def _running_group(param: str, tmp_path: Path) -> AsyncIterator[Group]:
    keys = tmp_path / "exit.keys"
    keys.write_text(f"{KEY_ID} {SECRET.decode()}\n")
    keys.chmod(0o600)
    port, metrics_port = free_port(), free_port()
    options: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}", "keys": str(keys), "allow": ["127.0.0.1/32:*"],
        "heartbeat": 0.5, "log_format": "json", "workers": 2,
        "metrics": f"127.0.0.1:{metrics_port}", "no_uvloop": param.startswith("asyncio"),
    }  # fmt: skip
    tls: Optional[TlsClient] = None
    if param.endswith("-tls"):
        pki = make_pki(tmp_path / "pki")
        pki.server.key.chmod(0o600)
        options.update(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
        tls = TlsClient(client_context(pki.ca.cert), "exit.test")
    config = write_config(tmp_path / "exit.toml", "exit", options)
    log = tmp_path / "exit.log"
    handle = log.open("wb")
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the supervisor's private directory
    proc = subprocess.Popen(
        [str(BIN / "relay-exit"), "--config", str(config)], stderr=handle, env=env
    )
    g = Group(proc, port, metrics_port, log, config, tls)
    try:
        deadline = time.monotonic() + 30
        while not any(line["msg"] == "listening" and "workers" in line for line in g.lines()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        yield g
    finally:
        terminate(popens=[proc], timeout=25)
        terminate(pids=[p for p in g.all_pids() if _ours(p, config)])
        handle.close()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    await s.close()


async def _worker(address: tuple[str, int], tls: Optional[TlsClient] = None) -> RelayWorker:
    worker = RelayWorker(
        worker_settings(None, address, heartbeat=0.5, reconnect_max=0.5, exit_tls=tls)
    )
    await worker.start()
    return worker


def _owner(worker: RelayWorker) -> int:
    """The process that holds the worker's session (its id names it)."""
    (client,) = worker.exits.values()
    owner = ho.session_owner(client.session_id, 2)
    assert owner in (0, 1), client.session_id.hex()
    return owner


async def _up(worker: RelayWorker) -> None:
    """The worker's session is open and both its carriers are in."""
    (client,) = worker.exits.values()
    await _wait_for(lambda: len(client.carriers) == 2, "the worker's two carriers")


async def _workers_on_both(
    group: Group,
    port: int,
    flows_each: int,
    workers: list[RelayWorker],
    flows: list[Flow],
    enough: Any = lambda g: True,
) -> None:
    """Add workers (a session each, ``flows_each`` streams each) to ``workers`` until both
    processes hold a session and ``enough(group)`` holds; the kernel and the nonces decide
    where, so at most 16. The caller stops them."""
    while len(workers) < 16:
        worker = await _worker(("127.0.0.1", group.port), group.tls)
        workers.append(worker)
        await _up(worker)
        flows += await open_flows(worker, port, flows_each)
        if {_owner(w) for w in workers} == {0, 1} and enough(group):
            return
    raise AssertionError("16 sessions, and still not both processes (or not enough handoffs)")


async def test_sessions_spread_over_both_processes_each_in_one_and_metrics_show_both(
    any_group: Group, servers: Servers
) -> None:
    group = any_group
    port = await servers.start(echo_handler)

    def handed_off(g: Group) -> bool:
        """Both kinds of HELLO were read by a process that does not own them at least once."""
        new = g.by_worker("relay_handoffs_total", kind="new", result="sent")
        join = g.by_worker("relay_handoffs_total", kind="resume", result="sent")
        return sum(new) >= 1 and sum(join) >= 1

    workers: list[RelayWorker] = []
    flows: list[Flow] = []
    try:
        await _workers_on_both(group, port, 3, workers, flows, handed_off)
        await _wait_for(lambda: all(f.echoed > 2 for f in flows), "echoes")
        owners = [_owner(w) for w in workers]
        # every carrier and every stream of a session is in the process that owns it
        expected = [owners.count(0), owners.count(1)]
        assert group.by_worker("relay_carriers_active") == [2.0 * n for n in expected]
        assert group.by_worker("relay_streams_active") == [3.0 * n for n in expected]
        assert group.value("relay_exit_worker_up", worker="0") == 1
        assert group.value("relay_exit_worker_up", worker="1") == 1
        # HELLOs the other process read were handed over (new sessions by nonce, further
        # carriers by session id) and adopted by the owner
        for kind in ("new", "resume"):
            sent = group.by_worker("relay_handoffs_total", kind=kind, result="sent")
            adopted = group.by_worker("relay_handoffs_total", kind=kind, result="adopted")
            assert sum(sent) == sum(adopted) >= 1, (kind, sent, adopted)
        assert all(f.ended is None for f in flows)
        # the clients close cleanly: every stream ends at the exit, in its own process
        await asyncio.gather(*(f.finish() for f in flows))
        await _wait_for(lambda: sum(group.by_worker("relay_streams_active")) == 0, "streams to end")
    finally:
        for f in flows:
            f.close()
        for worker in workers:
            await worker.stop()
    ended = [
        sum(v for (n, labels), v in group.samples().items()
            if n == "relay_streams_total" and dict(labels)["worker"] == str(i))
        for i in range(2)
    ]  # fmt: skip
    assert ended == [3.0 * owners.count(0), 3.0 * owners.count(1)], ended
    assert group.by_worker("relay_streams_total", result="ok") == ended  # all closed cleanly


def _reset_one(cutter: Cutter) -> None:
    """Break one carrier (both ends see a TCP reset); the session's other one lives on."""
    link = cutter.links.pop(0)
    for writer in link.writers:
        _reset(writer)


async def test_a_lost_carrier_is_replaced_in_the_process_that_holds_the_session(
    any_group: Group, servers: Servers
) -> None:
    """Carriers die one at a time: their streams move to the other carrier at once, and the
    replacement (a join with the session id) reaches the owner, handed over when the other
    process read it; the streams never notice."""
    group = any_group
    port = await servers.start(echo_handler)
    cutter = Cutter(("127.0.0.1", group.port))
    await cutter.start()
    worker = await _worker(cutter.address, group.tls)
    flows: list[Flow] = []
    try:
        await _up(worker)
        owner = _owner(worker)
        flows = await open_flows(worker, port, 6)
        await _wait_for(lambda: all(f.echoed > 2 for f in flows), "echoes")
        assert group.by_worker("relay_carriers_active")[owner] == 2
        assert group.by_worker("relay_carriers_active")[1 - owner] == 0
        for cuts in range(1, 41):
            _reset_one(cutter)
            await _wait_for(lambda n=cuts: cutter.accepted >= 2 + n, "a replacement carrier")
            await _up(worker)
            await _wait_for(
                lambda: (
                    group.by_worker("relay_carriers_active")
                    == ([2.0, 0.0] if owner == 0 else [0.0, 2.0])
                ),
                "both carriers in the owner",
            )
            joins = group.by_worker("relay_handoffs_total", kind="resume", result="sent")
            if joins[1 - owner] >= 1:
                break
        joins = group.by_worker("relay_handoffs_total", kind="resume", result="sent")
        assert joins[1 - owner] >= 1 and joins[owner] == 0, joins
        adopted = group.by_worker("relay_handoffs_total", kind="resume", result="adopted")
        assert adopted[owner] == joins[1 - owner] and adopted[1 - owner] == 0, adopted
        before = [f.echoed for f in flows]
        await _wait_for(
            lambda: all(f.echoed > b for f, b in zip(flows, before)), "echoes after the cuts"
        )
        assert all(f.ended is None for f in flows)
        assert group.by_worker("relay_streams_active")[owner] == 6
        assert group.by_worker("relay_resumes_total", result="unknown") == [0.0, 0.0]
    finally:
        for f in flows:
            f.close()
        await worker.stop()
        await cutter.close()


async def test_resume_on_the_other_process_is_handed_over_and_completes(
    any_group: Group, servers: Servers
) -> None:
    """All carriers die at once: the session is parked in its process, and the resume (two
    joins) reaches it from either process; the stream's bytes all arrive."""
    group = any_group
    port = await servers.start(answer_after_eof_handler)
    cutter = Cutter(("127.0.0.1", group.port))
    await cutter.start()
    worker = await _worker(cutter.address, group.tls)
    try:
        from python_socks.async_.asyncio import Proxy

        await _up(worker)
        owner = _owner(worker)
        url = f"socks5://glidein:local-pass@127.0.0.1:{worker.address[1]}"
        sock = await Proxy.from_url(url).connect("127.0.0.1", port, timeout=20)
        reader, writer = await asyncio.open_connection(sock=sock)
        digest = hashlib.sha256()
        cuts = 0
        for _ in range(40):  # each new carrier lands on either process: cut until one
            chunk = os.urandom(256 * 1024)  # lands on the process not owning the session
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
            await _wait_for(
                lambda n=cuts: sum(group.by_worker("relay_resumes_total", result="ok")) >= n,
                "the previous resume",
            )
            await _up(worker)
            assert cutter.reset_all() >= 1
            cuts += 1
            handed = group.by_worker("relay_handoffs_total", kind="resume", result="sent")
            if handed[1 - owner] >= 1:
                break
        await _wait_for(
            lambda: sum(group.by_worker("relay_resumes_total", result="ok")) >= cuts,
            "the last resume",
        )
        handed = group.by_worker("relay_handoffs_total", kind="resume", result="sent")
        assert handed[1 - owner] >= 1 and handed[owner] == 0, handed
        adopted = group.by_worker("relay_handoffs_total", kind="resume", result="adopted")
        assert adopted[owner] == handed[1 - owner] and adopted[1 - owner] == 0, adopted
        resumes = group.by_worker("relay_resumes_total", result="ok")
        assert resumes[owner] >= cuts and resumes[1 - owner] == 0, resumes
        last = os.urandom(1024 * 1024)
        digest.update(last)
        writer.write(last)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.readline(), 60)
        assert answer == b"sha256=" + digest.hexdigest().encode() + b"\n"
        writer.close()
    finally:
        await worker.stop()
        await cutter.close()


async def _hello_answer(port: int, hello: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x05\x01\x80" + hello)
        assert await reader.readexactly(2) == b"\x05\x80"
        decoded = hl.decode_reply(await reader.readexactly(hl.REPLY_SIZE))
        assert decoded is not None
        return decoded[0].status
    finally:
        writer.close()


async def test_a_replayed_hello_is_refused_by_whichever_process_reads_it(group: Group) -> None:
    nonce = os.urandom(16)
    hello = hl.encode_hello(SECRET, KEY_ID, int(time.time() * 1000), nonce)
    owner = ho.nonce_owner(nonce, 2)
    assert await _hello_answer(group.port, hello) == hl.OK
    replays = 0
    for _ in range(40):
        assert await _hello_answer(group.port, hello) == hl.REPLAY
        replays += 1
        if group.by_worker("relay_handoffs_total", kind="new", result="sent")[1 - owner] >= 2:
            break  # a replay (not only the first HELLO) was read by the other process
    sent = group.by_worker("relay_handoffs_total", kind="new", result="sent")
    assert sent[1 - owner] >= 1 and sent[owner] == 0, sent
    refused = group.by_worker("relay_auth_failures_total", reason="replay")
    assert refused[owner] == replays and refused[1 - owner] == 0, refused


async def test_sighup_reaches_every_process_and_sigterm_drains_them_all(
    group: Group, servers: Servers
) -> None:
    port = await servers.start(echo_handler)
    worker = await _worker(("127.0.0.1", group.port))
    try:
        before = len(group.lines())
        group.proc.send_signal(signal.SIGHUP)
        await _wait_for(
            lambda: (
                {line.get("worker") for line in group.lines()[before:] if line["msg"] == "reloaded"}
                == {0, 1}
            ),
            "both processes to reload",
        )
        (flow,) = await open_flows(worker, port, 1)
        await _wait_for(lambda: flow.echoed > 2, "echoes")
        pids = group.child_pids()
        group.proc.send_signal(signal.SIGTERM)
        await _wait_for(
            lambda: (
                sum(1 for line in group.lines() if line["msg"].startswith("stopping: drain")) >= 3
            ),
            "the drain to start",
        )
        assert group.proc.poll() is None  # the open stream is being drained
        flow.close()
        await _wait_for(lambda: group.proc.poll() is not None, "the supervisor to exit", 30)
        assert group.proc.returncode == 0, group.log.read_text()[-2000:]
        assert not any(pid_alive(pid) for pid in pids.values())
    finally:
        await worker.stop()


async def test_a_crashed_process_is_restarted(group: Group, servers: Servers) -> None:
    port = await servers.start(echo_handler)
    first = group.child_pids()
    os.kill(first[0], signal.SIGKILL)
    await _wait_for(
        lambda: (
            group.child_pids()[0] != first[0]
            and group.value("relay_exit_worker_up", worker="0") == 1
        ),
        "worker 0 to come back",
    )
    assert group.value("relay_exit_worker_restarts_total", worker="0") == 1
    assert group.child_pids()[1] == first[1]
    workers: list[RelayWorker] = []
    flows: list[Flow] = []
    try:
        await _workers_on_both(group, port, 4, workers, flows)
        await _wait_for(lambda: all(f.echoed > 2 for f in flows), "echoes")
        assert min(group.by_worker("relay_streams_active")) >= 4
    finally:
        for f in flows:
            f.close()
        for worker in workers:
            await worker.stop()


async def test_processes_stop_when_the_supervisor_is_gone(group: Group) -> None:
    pids = group.child_pids()
    group.proc.kill()
    group.proc.wait()
    await _wait_for(lambda: not any(pid_alive(pid) for pid in pids.values()), "workers to stop")

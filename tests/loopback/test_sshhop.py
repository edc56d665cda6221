"""The SSH hop's manners towards login nodes: failover order and the connection budget."""

from __future__ import annotations

import asyncio

import pytest

from relay.metrics import Metrics
from relay.net.sshhop import BatchedWrites, ConnectBudget, Login, SshHop, SshUnavailable
from tests.support.helpers import Servers, echo_handler, metric
from tests.support.sshd import Sshd, start_sshd


def test_budget_allows_a_burst_then_the_rate() -> None:
    budget = ConnectBudget(4, now=0.0)
    assert [budget.take(0.0) for _ in range(4)] == [0.0] * 4
    wait = budget.take(0.0)
    assert wait == pytest.approx(15.0)
    assert budget.take(14.0) > 0
    assert budget.take(15.0 + 1e-6) == 0.0


async def test_login_nodes_are_not_hammered(sshd: Sshd) -> None:
    """With the node down, repeated demands for a connection cost one login per budget."""
    login = Login(sshd.user, sshd.host, sshd.port)
    sshd.stop()
    metrics = Metrics("worker")
    hop = SshHop([login], sshd.client_key, sshd.known_hosts, metrics,
                 connects_per_minute=2, retry_after=0.0)  # fmt: skip
    errors = []
    for _ in range(6):
        with pytest.raises(SshUnavailable) as info:
            await hop.connection()
        errors.append(info.value)
    assert metric(metrics, "relay_ssh_connects_total", login=str(login), result="failed") == 2
    limited = metric(metrics, "relay_ssh_connects_total", login=str(login), result="rate-limited")
    assert limited == 4
    assert errors[-1].retry_after > 0
    await hop.close()


async def test_failover_starts_with_the_node_that_worked(tmp_path) -> None:
    first = start_sshd(tmp_path / "a")
    second = start_sshd(tmp_path / "b", client_key=first.client_key)
    known = tmp_path / "known_hosts"
    known.write_text(first.known_hosts.read_text() + second.known_hosts.read_text())
    logins = [Login(s.user, s.host, s.port) for s in (first, second)]
    metrics = Metrics("worker")
    hop = SshHop(logins, first.client_key, known, metrics, retry_after=0.0)
    try:
        first.stop()
        conn = await hop.connection()
        assert hop.current == logins[1]
        conn.close()
        await conn.wait_closed()
        first.restart()
        await hop.connection()
        assert hop.current == logins[1]  # no needless move back, no extra login on the first
        assert metric(metrics, "relay_ssh_connects_total", login=str(logins[0]),
                      result="failed") == 1  # fmt: skip
    finally:
        await hop.close()
        first.stop()
        second.stop()


async def test_packets_of_one_callback_leave_in_one_write(sshd: Sshd) -> None:
    """Channel writes made in one callback reach the socket as one writelines(), in order.

    asyncssh keeps its transport in ``_transport`` and writes every SSH packet to it; this
    fails if a new asyncssh stops writing through the transport the tunnel hook gave it.
    """
    servers = Servers()
    port = await servers.start(echo_handler)
    login = Login(sshd.user, sshd.host, sshd.port)
    hop = SshHop([login], sshd.client_key, sshd.known_hosts, Metrics("worker"))
    try:
        conn = await hop.connection()
        link = conn._transport
        assert isinstance(link, BatchedWrites)
        reader, writer = await conn.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        flushes = []
        real_writelines = link.transport.writelines

        def counting(chunks: list[bytes]) -> None:
            flushes.append(len(chunks))
            real_writelines(chunks)

        link.transport.writelines = counting
        pieces = [bytes([i]) * 1000 for i in range(64)]
        for piece in pieces:
            writer.write(piece)  # one SSH packet each
        echoed = await asyncio.wait_for(reader.readexactly(64_000), 10)
        assert echoed == b"".join(pieces)
        assert flushes and flushes[0] >= 64
        writer.close()
    finally:
        await hop.close()
        await servers.close()


def test_batched_writes_keep_order_and_flush_before_abort() -> None:
    loop = asyncio.new_event_loop()
    try:
        sent: list[bytes] = []

        class Sink:
            closed = False

            def writelines(self, chunks: list[bytes]) -> None:
                sent.extend(chunks)

            def write(self, data: bytes) -> None:
                sent.append(data)

            def is_closing(self) -> bool:
                return self.closed

            def abort(self) -> None:
                self.closed = True

            def get_write_buffer_size(self) -> int:
                return 0

        link = BatchedWrites(Sink(), loop)
        link.write(b"a")
        link.writelines([b"b", b"c"])
        assert sent == [] and link.get_write_buffer_size() == 3
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert sent == [b"a", b"b", b"c"]
        link.write(b"d")
        link.abort()
        assert sent[-1] == b"d" and link.transport.closed
        link.write(b"e")  # after abort: dropped with the connection, never raised
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert sent[-1] == b"d"
    finally:
        loop.close()

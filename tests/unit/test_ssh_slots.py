"""The SSH hop's slots (``--ssh-connections``) in memory: where carriers go, that every slot's
logins take tokens of the one budget per login node, and that a slot's loss leaves the others
alone. Logins are stand-ins and the clock is a number the test moves."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.metrics import Metrics
from relay.net.sshhop import ConnectBudget, Login, SshHop, SshUnavailable, slot_for
from relay.worker.exitclient import next_place
from tests.support.helpers import metric

LOGINS = [Login("relay", "login1.example", 22), Login("relay", "login2.example", 22)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    """What the hop needs of a login: it ends when closed, or when the test kills it."""

    def __init__(self, login: Login, slot: int) -> None:
        self.login = login
        self.slot = slot
        self.extra: dict[str, Any] = {}
        self._ended = asyncio.get_running_loop().create_future()

    def set_extra_info(self, **kwargs: Any) -> None:
        self.extra.update(kwargs)

    def close(self) -> None:
        if not self._ended.done():
            self._ended.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._ended)


class Logins:
    """Stands in for SshHop._connect: records each login (when, where, which slot) and
    succeeds, or fails like an unreachable node while ``failing``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.failing: set[Login] = set()
        self.made: list[tuple[float, Login, int]] = []
        self.open: list[FakeConnection] = []

    async def __call__(self, login: Login, slot: int = 0) -> FakeConnection:
        self.made.append((self.clock.now, login, slot))
        if login in self.failing:
            raise ConnectionRefusedError("connection refused")
        conn = FakeConnection(login, slot)
        self.open.append(conn)
        return conn

    def at(self, login: Login) -> list[float]:
        return [when for when, where, _ in self.made if where == login]


def hop_with(
    connections: int, per_minute: float = 4.0, logins: list[Login] = LOGINS[:1], **kw: Any
) -> tuple[SshHop, Logins, Clock, Metrics]:
    clock = Clock()
    metrics = Metrics("worker")
    hop = SshHop(logins, None, None, metrics, connects_per_minute=per_minute,
                 connections=connections, clock=clock, **kw)  # fmt: skip
    fake = Logins(clock)
    hop._connect = fake  # type: ignore[method-assign]
    return hop, fake, clock, metrics


def within_cap(times: list[float], per_minute: float) -> bool:
    """No span of time holds more logins than the bucket allows: its size plus the rate."""
    times = sorted(times)
    capacity, rate = max(1.0, per_minute), per_minute / 60.0
    return all(
        j - i + 1 <= capacity + rate * (times[j] - times[i]) + 1e-9
        for i in range(len(times))
        for j in range(i, len(times))
    )


# -- placement ------------------------------------------------------------------------------
def test_with_as_many_connections_as_carriers_each_carrier_has_its_own() -> None:
    assert [slot_for(k, 2) for k in range(2)] == [0, 1]
    assert [slot_for(k, 1) for k in range(3)] == [0, 0, 0]
    assert [slot_for(k, 3) for k in range(2)] == [0, 1]  # a third slot stays unused


@given(st.integers(1, 16), st.integers(1, 16))
def test_carriers_spread_evenly_over_the_slots(carriers: int, connections: int) -> None:
    load = [0] * connections
    for place in range(carriers):
        load[slot_for(place, connections)] += 1
    assert max(load) - min(load) <= 1
    assert sum(1 for n in load if n) == min(carriers, connections)


def test_the_next_carrier_takes_a_free_place_on_a_live_connection_first() -> None:
    assert next_place([], 2, lambda place: True) == 0
    assert next_place([0], 2, lambda place: True) == 1
    assert next_place([], 2, lambda place: place == 1) == 1  # slot 0 waits for its budget
    assert next_place([], 2, lambda place: False) == 0
    assert next_place([1], 2, lambda place: False) == 0
    assert next_place([0, 1], 2, lambda place: True) not in (0, 1)  # never a taken place


# -- the budget -----------------------------------------------------------------------------
@given(
    st.floats(0.5, 30.0),
    st.lists(st.floats(0.0, 300.0, allow_nan=False), min_size=1, max_size=80),
)
def test_the_budget_never_grants_more_than_its_cap(per_minute: float, asks: list[float]) -> None:
    budget = ConnectBudget(per_minute, now=0.0)
    granted = [t for t in sorted(asks) if budget.take(t) == 0.0]
    assert within_cap(granted, per_minute)


# -- the hop's slots ------------------------------------------------------------------------
async def test_two_slots_log_in_twice_at_start_and_then_not_again() -> None:
    hop, fake, _, metrics = hop_with(2)
    first = await hop.connection(0)
    second = await hop.connection(1)
    assert first is not second
    assert [slot for _, _, slot in fake.made] == [0, 1]
    assert await hop.connection(0) is first and await hop.connection(1) is second
    assert len(fake.made) == 2
    assert metric(metrics, "relay_ssh_connects_total", login=str(LOGINS[0]), result="ok") == 2
    assert metric(metrics, "relay_ssh_connections_active") == 2
    assert hop.connections == 2 and hop.slot_connected(0) and hop.slot_connected(1)
    await hop.close()
    assert metric(metrics, "relay_ssh_connections_active") == 0
    assert not hop.connected


async def test_a_slot_that_dies_logs_in_alone_and_the_others_stay() -> None:
    hop, fake, clock, metrics = hop_with(2)
    conns = [await hop.connection(0), await hop.connection(1)]
    conns[1].close()
    for _ in range(3):
        await asyncio.sleep(0)
    assert hop.slot_connected(0) and not hop.slot_connected(1) and hop.connected
    assert metric(metrics, "relay_reconnects_total") == 1
    assert metric(metrics, "relay_ssh_connections_active") == 1
    clock.now += 1
    again = await hop.connection(1)
    assert again is not conns[1] and await hop.connection(0) is conns[0]
    assert [slot for _, _, slot in fake.made] == [0, 1, 1]
    await hop.close()


async def test_each_slot_fails_over_on_its_own() -> None:
    hop, fake, _, _ = hop_with(2, logins=LOGINS, retry_after=0.0)
    fake.failing = {LOGINS[0]}
    await hop.connection(0)
    assert hop.current == LOGINS[1]
    fake.failing = set()
    await hop.connection(1)  # slot 1 had no failure: it starts with the first node
    assert [(login, slot) for _, login, slot in fake.made] == [
        (LOGINS[0], 0),
        (LOGINS[1], 0),
        (LOGINS[0], 1),
    ]
    await hop.close()


async def test_the_logins_of_every_slot_share_one_cap() -> None:
    """N = 2 under a cap of 4 a minute: 2 logins at start; slots that keep dying get 2 more
    at once, then one per 15 s between them, not one per 15 s each."""
    hop, fake, clock, metrics = hop_with(2, per_minute=4.0, retry_after=0.0)
    await hop.connection(0)
    await hop.connection(1)
    refused = 0
    for _ in range(40):
        for conn in list(fake.open):
            conn.close()
        fake.open.clear()
        for _ in range(3):
            await asyncio.sleep(0)
        for slot in (0, 1):
            try:
                await hop.connection(slot)
            except SshUnavailable as exc:
                assert exc.retry_after > 0
                refused += 1
        clock.now += 3.0
    times = fake.at(LOGINS[0])
    assert within_cap(times, 4.0)
    assert times[:4] == [1000.0] * 4  # the burst: 2 at start, 2 replacements
    assert len(times) <= 4 + 4 * (clock.now - 1000.0) / 60 + 1
    login = str(LOGINS[0])
    assert metric(metrics, "relay_ssh_connects_total", login=login, result="ok") == len(times)
    assert metric(metrics, "relay_ssh_connects_total", login=login, result="rate-limited") == (
        refused
    )
    await hop.close()


@pytest.mark.parametrize("connections", [1, 2, 3])
async def test_a_storm_of_failures_stays_under_the_cap(connections: int) -> None:
    """Login nodes that refuse every login, every slot asking at random moments: each node
    still sees no more logins than its budget allows, however many slots there are."""
    hop, fake, clock, metrics = hop_with(
        connections, per_minute=4.0, logins=LOGINS, retry_after=0.0
    )
    fake.failing = set(LOGINS)
    draw = random.Random(connections)
    for _ in range(400):
        clock.now += draw.uniform(0.0, 2.0)
        with pytest.raises(SshUnavailable):
            await hop.connection(draw.randrange(connections))
    for login in LOGINS:
        times = fake.at(login)
        assert within_cap(times, 4.0), login
        failed = metric(metrics, "relay_ssh_connects_total", login=str(login), result="failed")
        assert failed == len(times)
    await hop.close()

"""Flow control holds for writelines() on every loop and Python the relay runs on.

The pumps write with writelines(); CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 never paused the
protocol there (relay.net.compat works around it), so on asyncio's own loop a slow receiver got
no back-pressure and the relay buffered whole transfers.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

import pytest

import relay.net.daemon  # noqa: F401 - importing the daemons applies relay.net.compat
from relay.net.compat import fix_writelines_flow_control


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def _loops() -> list[Any]:
    params: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return params
    return [*params, pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.mark.parametrize("new_loop", _loops())
def test_writelines_pauses_the_protocol_and_resumes_it(new_loop: Callable[[], Any]) -> None:
    async def exercise() -> list[str]:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        recorder = _Recorder()
        transport, _ = await loop.create_connection(lambda: recorder, sock=ours)
        try:
            transport.writelines([b"x" * (1 << 20)] * 4)  # far beyond the socket buffers
            assert transport.get_write_buffer_size() > 64 * 1024
            assert recorder.events == ["pause"]
            received = 0
            while received < 4 << 20:
                try:
                    received += len(peer.recv(1 << 20))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            return recorder.events
        finally:
            transport.close()
            peer.close()

    loop = new_loop()
    try:
        assert loop.run_until_complete(exercise()) == ["pause", "resume"]
    finally:
        loop.close()


def test_the_fix_is_applied_once() -> None:
    assert fix_writelines_flow_control() is False  # done on import, or not needed here

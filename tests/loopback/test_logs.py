"""Structured logs: both daemons write one "stream closed" line per stream, and with
``--log-format json`` it carries stream id, key id, destination, bytes, duration, result and
reason; the text line says the same in one short line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from relay.logs import JsonFormatter, TextFormatter
from tests.support.helpers import KEY_ID, Chain, reset_handler, wait_for

FIELDS = ("stream", "key", "dest", "up", "down", "duration", "result", "reason")


class Capture(logging.Handler):
    """Formats the records of one logger with both formatters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.json: list[dict[str, object]] = []
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.json.append(json.loads(JsonFormatter().format(record)))
        self.text.append(TextFormatter().format(record))


@pytest.fixture
def stream_log() -> Iterator[Capture]:
    logger = logging.getLogger("relay.stream")
    capture = Capture()
    old_level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)


async def test_both_daemons_log_one_structured_line_per_stream(
    chain: Chain, stream_log: Capture
) -> None:
    reader, writer = await chain.open("127.0.0.1", chain.echo_port)
    writer.write(b"x" * 1000)
    await writer.drain()
    writer.write_eof()
    echoed = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    assert echoed == b"x" * 1000
    closed = stream_log.json
    assert await wait_for(lambda: len([r for r in closed if r["msg"] == "stream closed"]) == 2)
    lines = [r for r in closed if r["msg"] == "stream closed"]
    for line in lines:
        assert set(FIELDS) <= set(line), line
        assert line["key"] == KEY_ID
        assert line["dest"] == f"127.0.0.1:{chain.echo_port}"
        assert line["up"] == 1000 and line["down"] == 1000
        assert line["result"] == "ok" and line["reason"] == ""
        assert isinstance(line["duration"], float) and 0 <= line["duration"] < 20
        assert isinstance(line["stream"], str) and line["stream"]
        assert line["level"] == "info" and isinstance(line["ts"], float)
    # worker and exit each number their streams
    assert len({line["stream"] for line in lines}) == 2
    text = [t for t in stream_log.text if "stream closed" in t]
    assert len(text) == 2
    for line in text:
        assert "\n" not in line and len(line) < 200
        for name in FIELDS:
            assert f" {name}=" in line, line


async def test_a_reset_stream_says_why(chain: Chain, stream_log: Capture) -> None:
    """A reset from the destination ends the line with result and reason, not silence."""
    port = await chain.servers.start(reset_handler)
    reader, writer = await chain.open("127.0.0.1", port)
    writer.write(b"hello\n")
    await writer.drain()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(100), 20)
    writer.close()
    assert await wait_for(
        lambda: len([r for r in stream_log.json if r["msg"] == "stream closed"]) == 2
    )
    results = sorted(str(r["result"]) for r in stream_log.json if r["msg"] == "stream closed")
    assert results == ["peer-reset", "peer-reset"], stream_log.json
    assert all(r["reason"] for r in stream_log.json if r["msg"] == "stream closed")

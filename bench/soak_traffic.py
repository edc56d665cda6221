"""Soak traffic: about N streams through a SOCKS5 proxy, every stream's bytes checked.

    python -m bench.soak_traffic --socks HOST:PORT --auth USER:PASS --sink-host H \
        --echo-port P1 --bulk-port P2 --flaky-port P3 --streams N --duration SECONDS \
        --idle-interval SECONDS [--bulk-size BYTES] [--mix idle=0.9,rr=0.08,bulk=0.01,flaky=0.01]
        --out FILE.jsonl [--seed S] [--hang-after SECONDS] (more: --help)

The destinations are ``bench.soak_sink``. The N streams are slots, shared out among the kinds
by ``--mix``; a slot runs one stream after another until the end:

- idle: one echo exchange at once, then one every ``--idle-interval`` (jittered 0.5-1.5x)
  for 2-10 intervals, then a half-close and EOF expected (long-lived control connections);
- rr: 5-50 echo exchanges back to back, then the same close;
- bulk: ``--bulk-size`` bytes down (checked here) or up (checked by the sink, which answers
  ``OK``) through the bulk port;
- flaky: as idle, against the flaky port (the sink resets or silences it on signals).

An exchange is one message (stream tag, sequence number, 16-200 random bytes; rr 16-2048)
that must come back byte for byte.

Each stream ends as one JSON line in ``--out``: ``id, kind, outcome, started, ended,
bytes_sent, bytes_verified, error, phase`` (bulk adds ``dir``). Outcomes:

- ok: every byte sent came back (or, bulk, arrived / was confirmed) intact, then a clean EOF;
- corrupt: a byte differs, a byte is extra (repeated, or after the expected end) or the sink
  answered BAD; never expected;
- reset: the connection was reset, or ended early (EOF) with every byte so far intact;
- hung: no progress (SOCKS reply, echo, bulk bytes, the write side draining, the closing EOF)
  within ``--hang-after`` seconds; the stream is then aborted;
- open_failed: the proxy refused the TCP connection, the method or the credentials, or
  answered the CONNECT with an error.

At the end of ``--duration`` (or on SIGTERM/SIGINT) no new stream starts and the running ones
finish: idle and flaky streams do one last exchange and close. A second SIGTERM/SIGINT aborts
what is left (recorded as hung, error "aborted"). The last line of ``--out`` (also printed) is the
summary; a status line goes to stdout every ``--status-interval`` seconds. Exit status: 3 if
any stream was corrupt, else 4 if any hung, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import resource
import signal
import struct
import sys
import time
from typing import IO, Any, Optional

from bench.soak_sink import BLOCK, Checker, first_difference, pattern_chunks, raise_nofile, run

KINDS = ("idle", "rr", "bulk", "flaky")
OUTCOMES = ("ok", "reset", "corrupt", "hung", "open_failed")
DEFAULT_MIX = "idle=0.9,rr=0.08,bulk=0.01,flaky=0.01"
HEADER = struct.Struct(">IIIH")  # run token, stream id, sequence number, payload length
BULK_LIMIT = 1 << 20
WRITE_HIGH = 1 << 20
SOCKS_REPLIES = {
    1: "general failure",
    2: "not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class StreamFailed(Exception):
    outcome = "reset"


class Corrupt(StreamFailed):
    outcome = "corrupt"


class OpenFailed(StreamFailed):
    outcome = "open_failed"


def parse_mix(text: str) -> dict[str, float]:
    mix = dict.fromkeys(KINDS, 0.0)
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in mix:
            raise argparse.ArgumentTypeError(f"unknown stream kind {name!r}")
        mix[name] = float(value)
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"negative share for {name}")
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("the mix is empty")
    return mix


def share_slots(streams: int, mix: dict[str, float]) -> dict[str, int]:
    """Slots per kind in proportion to the mix (largest remainder); every kind with a share
    gets at least one slot when there are enough slots."""
    total = sum(mix.values())
    exact = {k: streams * v / total for k, v in mix.items()}
    slots = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(KINDS, key=lambda k: exact[k] - slots[k], reverse=True)
    for k in by_remainder[: streams - sum(slots.values())]:
        slots[k] += 1
    wanted = [k for k in KINDS if mix[k] > 0]
    if streams >= len(wanted):
        for k in wanted:
            if slots[k] == 0:
                slots[max(slots, key=lambda j: slots[j])] -= 1
                slots[k] = 1
    return slots


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def socks_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return b"\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return atyp + ip.packed + port.to_bytes(2, "big")


class Stream:
    """One connection through the proxy, from SOCKS handshake to its outcome."""

    def __init__(self, app: Traffic, sid: int, kind: str) -> None:
        self.app = app
        self.sid = sid
        self.kind = kind
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.task: Optional[asyncio.Task[dict[str, Any]]] = None
        self.phase = "start"
        self.since: Optional[float] = None  # monotonic time since waiting for progress
        self.hung = False
        self.bytes_sent = 0
        self.bytes_verified = 0
        self.record: dict[str, Any] = {}

    def expect(self, phase: str) -> None:
        """From now on progress is due within --hang-after."""
        self.phase = phase
        self.since = self.app.loop.time()

    async def run(self) -> dict[str, Any]:
        started = time.time()
        outcome, error = "ok", ""
        try:
            await self.open()
            if self.kind == "bulk":
                await self.bulk()
            else:
                await self.talk()
            self.phase = "done"
        except StreamFailed as e:
            outcome, error = e.outcome, str(e)
        except asyncio.CancelledError:
            if not (self.hung or self.app.aborting):
                raise
            outcome = "hung"
            waited = 0.0 if self.since is None else self.app.loop.time() - self.since
            error = "aborted" if not self.hung else f"no progress for {waited:.0f} s"
        except asyncio.IncompleteReadError as e:
            outcome, error = "reset", f"EOF after {len(e.partial)} of {e.expected} bytes"
        except (OSError, EOFError) as e:
            outcome, error = "reset", f"{type(e).__name__}: {e}"
        except Exception as e:
            outcome, error = "reset", self.describe(e)
        finally:
            self.since = None
            if self.writer is not None:
                if outcome == "ok":
                    self.writer.close()
                else:
                    self.writer.transport.abort()
        return {
            "id": self.sid,
            "kind": self.kind,
            "outcome": outcome,
            "started": round(started, 3),
            "ended": round(time.time(), 3),
            "bytes_sent": self.bytes_sent,
            "bytes_verified": self.bytes_verified,
            "error": error,
            "phase": self.phase,
            **self.record,
        }

    def describe(self, e: Exception) -> str:
        """The error of a reset this program has no rule for."""
        transport = None if self.writer is None else self.writer.transport
        if isinstance(e, RuntimeError) and transport is not None and transport.is_closing():
            # uvloop raises on a write to a transport the peer has already closed.
            cause = None if self.reader is None else self.reader.exception()
            return f"{type(cause).__name__}: {cause}" if cause else f"closed: {e}"
        return f"unexpected {type(e).__name__}: {e}"

    async def open(self) -> None:
        app = self.app
        try:
            self.expect("tcp_connect")
            limit = BULK_LIMIT if self.kind == "bulk" else 2**16
            r, w = await asyncio.open_connection(app.socks_host, app.socks_port, limit=limit)
            self.reader, self.writer = r, w
            w.transport.set_write_buffer_limits(high=WRITE_HIGH)
            request = app.connect_requests[self.kind]
            pipelined = app.args.socks_pipeline
            self.expect("socks_method")
            w.write(b"\x05\x01\x02" + (app.auth_request + request if pipelined else b""))
            await w.drain()
            reply = await r.readexactly(2)
            if reply != b"\x05\x02":
                raise OpenFailed(f"proxy chose method {reply.hex()}, not username/password")
            self.expect("socks_auth")
            if not pipelined:
                w.write(app.auth_request)
                await w.drain()
            reply = await r.readexactly(2)
            if reply[1] != 0:
                raise OpenFailed(f"authentication refused ({reply.hex()})")
            self.expect("socks_connect")
            if not pipelined:
                w.write(request)
                await w.drain()
            head = await r.readexactly(4)
            if head[0] != 5 or head[1] != 0:
                name = SOCKS_REPLIES.get(head[1], "unknown")
                raise OpenFailed(f"CONNECT answered {head[1]} ({name})")
            atyp = head[3]
            if atyp == 1:
                await r.readexactly(4 + 2)
            elif atyp == 4:
                await r.readexactly(16 + 2)
            elif atyp == 3:
                n = (await r.readexactly(1))[0]
                await r.readexactly(n + 2)
            else:
                raise OpenFailed(f"CONNECT reply with address type {atyp}")
        except StreamFailed:
            raise
        except asyncio.IncompleteReadError as e:
            raise OpenFailed(f"proxy closed during {self.phase}") from e
        except OSError as e:
            raise OpenFailed(f"{type(e).__name__}: {e}") from e
        except Exception as e:
            raise OpenFailed(self.describe(e)) from e

    async def exchange(self, seq: int, size: int) -> None:
        r, w = self.reader, self.writer
        assert r is not None and w is not None
        message = HEADER.pack(self.app.token, self.sid, seq, size) + self.app.rng.randbytes(size)
        self.expect("echo")
        w.write(message)
        self.bytes_sent += len(message)
        await w.drain()
        try:
            echo = await r.readexactly(len(message))
        except asyncio.IncompleteReadError as e:
            if e.partial != message[: len(e.partial)]:
                raise self.mismatch(e.partial, message, seq) from e
            raise StreamFailed(
                f"EOF after {len(e.partial)} of {len(message)} bytes of echo {seq}"
            ) from e
        if echo != message:
            raise self.mismatch(echo, message, seq)
        self.bytes_verified += len(message)

    def mismatch(self, got: bytes, want: bytes, seq: int) -> Corrupt:
        i = first_difference(got, want)
        return Corrupt(
            f"echo {seq}: byte {i} of {len(want)} differs: got {got[i : i + 8].hex()} "
            f"want {want[i : i + 8].hex()} (verified before: {self.bytes_verified})"
        )

    async def finish(self) -> None:
        """Half-close; the destination answers with EOF and nothing else."""
        r, w = self.reader, self.writer
        assert r is not None and w is not None
        w.write_eof()
        self.expect("close")
        rest = await r.read(BULK_LIMIT)
        if rest:
            raise Corrupt(f"{len(rest)} unexpected bytes before EOF: {rest[:16].hex()}")

    async def talk(self) -> None:
        app = self.app
        rng = app.rng
        if self.kind == "rr":
            for seq in range(rng.randint(5, 50)):
                await self.exchange(seq, rng.randint(16, 2048))
        else:
            await self.exchange(0, rng.randint(16, 200))
            for seq in range(1, rng.randint(2, 10) + 1):
                if app.stopping:
                    break
                self.since = None
                self.phase = "idle"
                await app.nap(app.idle_interval * rng.uniform(0.5, 1.5))
                await self.exchange(seq, rng.randint(16, 200))
        await self.finish()

    async def bulk(self) -> None:
        app = self.app
        r, w = self.reader, self.writer
        assert r is not None and w is not None
        direction = app.rng.choice(("down", "up"))
        seed = app.rng.getrandbits(62)
        size = app.bulk_size
        self.record = {"dir": direction}
        w.write(json.dumps({"dir": direction, "size": size, "seed": seed}).encode() + b"\n")
        if direction == "down":
            w.write_eof()
            self.expect("bulk_header")
            await w.drain()
            checker = Checker(seed, size)
            while True:
                self.expect("bulk_down")
                data = await r.read(BULK_LIMIT)
                if not data:
                    break
                error = checker.feed(data)
                if error is not None:
                    raise Corrupt(f"down seed {seed}: {error}")
                self.bytes_verified = checker.pos
            if checker.pos < size:
                raise StreamFailed(f"EOF after {checker.pos} of {size} bytes")
            return
        for chunk in pattern_chunks(seed, size):
            w.write(chunk)
            self.bytes_sent += len(chunk)
            if w.transport.get_write_buffer_size() > WRITE_HIGH - BLOCK:
                self.expect("bulk_up")
                await w.drain()
        self.expect("bulk_up")
        await w.drain()
        w.write_eof()
        self.expect("bulk_verdict")
        line = await r.readline()
        if line == b"OK\n":
            self.bytes_verified = size
            self.expect("close")
            rest = await r.read(BULK_LIMIT)
            if rest:
                raise Corrupt(f"up seed {seed}: after OK: {rest[:200]!r}")
        elif line.startswith(b"BAD"):
            raise Corrupt(f"up seed {seed}: sink: {line.decode(errors='replace').strip()}")
        elif line.endswith(b"\n"):
            raise Corrupt(f"up seed {seed}: verdict {line[:200]!r}")
        else:
            raise StreamFailed(f"EOF before the verdict ({len(line)} bytes of it)")


class Traffic:
    def __init__(self, args: argparse.Namespace, out: IO[str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.args = args
        self.out = out
        self.socks_host, self.socks_port = args.socks
        user, _, password = args.auth.partition(":")
        u, p = user.encode(), password.encode()
        self.auth_request = b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p
        self.sink_host = args.sink_host
        self.ports = {"echo": args.echo_port, "bulk": args.bulk_port, "flaky": args.flaky_port}
        self.connect_requests = {
            kind: b"\x05\x01\x00" + socks_address(self.sink_host, self.ports[port])
            for kind, port in (
                ("idle", "echo"),
                ("rr", "echo"),
                ("bulk", "bulk"),
                ("flaky", "flaky"),
            )
        }
        self.idle_interval = args.idle_interval
        self.bulk_size = args.bulk_size
        self.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(6), "big")
        self.rng = random.Random(self.seed)
        self.token = self.rng.getrandbits(32)
        self.slots = share_slots(args.streams, args.mix)
        self.pauses = {"idle": 0.0, "rr": args.rr_pause, "bulk": args.bulk_pause, "flaky": 0.0}
        self.active: set[Stream] = set()
        self.naps: set[asyncio.Future[None]] = set()
        self.stopping = False
        self.aborting = False
        self.signals = 0
        self.next_id = 0
        self.counts = {k: dict.fromkeys(OUTCOMES, 0) for k in KINDS}
        self.bytes_sent = 0
        self.bytes_verified = 0
        self.unexpected = 0
        self.started = time.time()
        self.stop_at: Optional[float] = None

    async def nap(self, seconds: float) -> None:
        """Sleep that ends early when the run stops."""
        if self.stopping or seconds <= 0:
            return
        fut = self.loop.create_future()
        handle = self.loop.call_later(seconds, _wake, fut)
        self.naps.add(fut)
        try:
            await fut
        finally:
            handle.cancel()
            self.naps.discard(fut)

    def on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            self.stop()
        elif not self.aborting:
            self.aborting = True
            for stream in list(self.active):
                if stream.task is not None:
                    stream.task.cancel()

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_at = time.time()
        # Idle streams wake for their last exchange spread over a moment, not all at once.
        spread = min(2.0, self.idle_interval)
        for fut in list(self.naps):
            self.loop.call_later(self.rng.uniform(0, spread), _wake, fut)

    async def slot(self, kind: str, delay: float) -> None:
        await self.nap(delay)
        while not self.stopping:
            stream = Stream(self, self.next_id, kind)
            self.next_id += 1
            stream.task = self.loop.create_task(stream.run())
            self.active.add(stream)
            try:
                record = await stream.task
            finally:
                self.active.discard(stream)
            self.note(record)
            pause = self.pauses[kind] if record["outcome"] == "ok" else self.args.retry_pause
            await self.nap(pause * self.rng.uniform(0.5, 1.5))

    def note(self, record: dict[str, Any]) -> None:
        self.counts[record["kind"]][record["outcome"]] += 1
        if record["error"].startswith("unexpected "):
            self.unexpected += 1
        self.bytes_sent += record["bytes_sent"]
        self.bytes_verified += record["bytes_verified"]
        self.out.write(json.dumps(record) + "\n")

    async def watchdog(self) -> None:
        hang_after = self.args.hang_after
        while True:
            await asyncio.sleep(min(1.0, hang_after / 4))
            now = self.loop.time()
            for stream in list(self.active):
                since = stream.since
                if since is not None and now - since > hang_after and not stream.hung:
                    stream.hung = True
                    if stream.task is not None:
                        stream.task.cancel()

    def totals(self) -> dict[str, int]:
        return {o: sum(self.counts[k][o] for k in KINDS) for o in OUTCOMES}

    def status(self) -> dict[str, Any]:
        active = dict.fromkeys(KINDS, 0)
        for stream in self.active:
            active[stream.kind] += 1
        return {
            "status": True,
            "time": round(time.time(), 3),
            "elapsed": round(time.time() - self.started, 1),
            "active": len(self.active),
            "active_by_kind": active,
            "streams": self.next_id,
            "outcomes": self.totals(),
            "stopping": self.stopping,
        }

    async def report(self) -> None:
        while True:
            await asyncio.sleep(self.args.status_interval)
            self.out.flush()
            print(json.dumps(self.status()), flush=True)

    def summary(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        totals = self.totals()
        return {
            "summary": True,
            "counts": self.counts,
            "totals": totals,
            "streams": self.next_id,
            "slots": self.slots,
            "bytes_sent": self.bytes_sent,
            "bytes_verified": self.bytes_verified,
            "started": round(self.started, 3),
            "stopped": None if self.stop_at is None else round(self.stop_at, 3),
            "ended": round(time.time(), 3),
            "aborted": self.aborting,
            "unexpected_errors": self.unexpected,
            "seed": self.seed,
            "token": self.token,
            "cpu_user": round(usage.ru_utime, 2),
            "cpu_sys": round(usage.ru_stime, 2),
            "max_rss_kib": usage.ru_maxrss,
            "exit": 3 if totals["corrupt"] else 4 if totals["hung"] else 0,
        }

    async def main(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.on_signal)
        self.loop.call_later(self.args.duration, self.stop)
        ramp = self.args.ramp if self.args.ramp is not None else min(self.idle_interval, 10.0)
        slots = [
            self.slot(kind, self.rng.uniform(0, ramp))
            for kind in KINDS
            for _ in range(self.slots[kind])
        ]
        helpers = [
            self.loop.create_task(self.watchdog()),
            self.loop.create_task(self.report()),
        ]
        try:
            await asyncio.gather(*slots)
        finally:
            for task in helpers:
                task.cancel()
        summary = self.summary()
        line = json.dumps(summary)
        self.out.write(line + "\n")
        self.out.flush()
        print(line, flush=True)
        return int(summary["exit"])


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socks", type=host_port, required=True, metavar="HOST:PORT")
    p.add_argument("--auth", required=True, metavar="USER:PASS")
    p.add_argument("--sink-host", required=True)
    p.add_argument("--echo-port", type=int, required=True)
    p.add_argument("--bulk-port", type=int, required=True)
    p.add_argument("--flaky-port", type=int, required=True)
    p.add_argument("--streams", type=int, required=True, help="streams open at any time")
    p.add_argument("--duration", type=float, required=True, help="seconds of new streams")
    p.add_argument("--idle-interval", type=float, required=True, help="seconds between echoes")
    p.add_argument("--bulk-size", type=int, default=8 << 20)
    p.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX))
    p.add_argument("--out", required=True, help="JSON lines: one per stream, then the summary")
    p.add_argument("--seed", type=int)
    p.add_argument("--hang-after", type=float, default=180.0)
    p.add_argument(
        "--ramp", type=float, help="slots start over this many seconds (min(interval, 10))"
    )
    p.add_argument(
        "--retry-pause",
        type=float,
        default=1.0,
        help="seconds (jittered 0.5-1.5x) before a slot replaces a stream that did not end ok",
    )
    p.add_argument(
        "--rr-pause",
        type=float,
        default=0.0,
        help="seconds (jittered 0.5-1.5x) before an rr stream that ended ok is replaced",
    )
    p.add_argument("--bulk-pause", type=float, default=0.0, help="the same for bulk streams")
    p.add_argument(
        "--socks-pipeline",
        action="store_true",
        help="send greeting, credentials and CONNECT in one flight instead of three",
    )
    p.add_argument("--status-interval", type=float, default=10.0)
    p.add_argument("--loop", choices=("auto", "asyncio"), default="auto")
    args = p.parse_args(argv)
    if args.streams < 1 or args.duration < 0 or args.idle_interval <= 0 or args.bulk_size < 0:
        p.error("--streams >= 1, --duration >= 0, --idle-interval > 0, --bulk-size >= 0")
    return args


async def _run(args: argparse.Namespace) -> int:
    with open(args.out, "w") as out:
        return await Traffic(args, out).main()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    return run(_run(args), args.loop)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

"""COMMAND's process group: start it, forward signals to it, report on it, return its status.

COMMAND runs in a session (and process group) of its own, so the wrapper decides what reaches
it: SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the wrapper are passed on to
the whole group (Slurm sends SIGTERM before the kill; HTCondor's master turns it into a graceful
shutdown). The wrapper itself keeps running until COMMAND has exited, so the relay stays up for
the glidein's last updates and stage-outs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Callable, Optional

from relay.net.loopbound import LoopBound

log = logging.getLogger("glidein_wrapper")

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def exit_status(returncode: int) -> int:
    """A shell's view of a child's end: its exit code, or 128+N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Signals:
    """Catches the forwarded signals for the wrapper's whole life.

    Before COMMAND exists they are remembered (and the wrapper does not start it); while it
    runs they go to its process group; after it has exited, one means "stop draining now".
    """

    arrived = LoopBound(asyncio.Event)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._pgid: Optional[int] = None
        self._forwarded = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        if self._loop is not None:
            for sig in FORWARDED:
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def attach(self, pgid: int) -> None:
        """COMMAND now runs as process group ``pgid``: pass on what arrived meanwhile."""
        self._pgid = pgid
        self._forward_pending()

    def detach(self) -> None:
        """COMMAND has exited: stop forwarding (its group may be gone or reused)."""
        self._pgid = None

    def _on_signal(self, signum: int) -> None:
        self.received.append(signum)
        self.arrived.set()
        if self._pgid is not None:
            self._forward_pending()
        else:
            log.info("received %s", signal_name(signum))

    def _forward_pending(self) -> None:
        assert self._pgid is not None
        while self._forwarded < len(self.received):
            signum = self.received[self._forwarded]
            self._forwarded += 1
            log.info("forwarding %s to COMMAND (process group %d)", signal_name(signum), self._pgid)
            try:
                os.killpg(self._pgid, signum)
            except ProcessLookupError:
                pass
            except PermissionError as exc:
                log.warning("cannot forward %s: %s", signal_name(signum), exc)


async def run_command(command: Sequence[str], env: Mapping[str, str], signals: Signals) -> int:
    """Run COMMAND in its own session until it exits; return its shell-style exit status."""
    try:
        proc = await asyncio.create_subprocess_exec(*command, env=dict(env), start_new_session=True)
    except FileNotFoundError:
        log.error("COMMAND not found: %s", command[0])
        return EXIT_NOT_FOUND
    except PermissionError as exc:
        log.error("cannot run COMMAND %s: %s", command[0], exc)
        return EXIT_NOT_EXECUTABLE
    log.info("COMMAND started", extra={"fields": {"pid": proc.pid, "command": command[0]}})
    signals.attach(proc.pid)
    returncode = await proc.wait()
    signals.detach()
    status = exit_status(returncode)
    how = f"killed by {signal_name(-returncode)}" if returncode < 0 else f"exited {returncode}"
    log.info("COMMAND %s", how, extra={"fields": {"status": status}})
    if _group_alive(proc.pid):
        log.warning("processes of COMMAND's group are still running after it exited")
    return status


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def status_lines(interval: float, describe: Callable[[], dict[str, object]]) -> None:
    """Log one ``status`` line every ``interval`` seconds until cancelled."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        fields: dict[str, object] = {"uptime": round(time.monotonic() - started)}
        fields.update(describe())
        log.info("status", extra={"fields": fields})

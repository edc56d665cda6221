"""Command-line entry points: relay-exit, relay-worker and relay (demo, exit, worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from typing import Any, Callable, Optional, Union

from relay import __version__
from relay.config.loading import Values, load_exit_config, load_worker_config
from relay.errors import ConfigError
from relay.exit.daemon import RelayExit
from relay.exit.group import GROUP_ENV, Group, GroupPlace
from relay.exit.settings import ExitSettings
from relay.logs import setup_logging
from relay.systemd import notify
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings

log = logging.getLogger("relay")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
DRAIN_SECONDS = 10.0


def use_uvloop(enabled: bool) -> str:
    """Install uvloop's event loop policy when wanted and installed; says which loop runs."""
    if enabled:
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


Daemon = Union[RelayExit, RelayWorker]


async def _serve(
    daemon: Daemon, reload: Optional[Callable[[], None]], group: Optional[Group] = None
) -> int:
    """Run until SIGTERM/SIGINT; then stop listening, let streams drain, reset the rest.
    A --workers process tells its supervisor, not systemd, and stops when it is gone."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await daemon.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    if group is not None:
        group.ready()
        group.watch_supervisor(stop.set)
    else:
        notify("READY=1\nSTATUS=serving")
    await stop.wait()
    if group is None:
        notify("STOPPING=1")
    else:
        # systemd signals the whole cgroup and the supervisor passes the signal on too: a
        # second one must not kill the drain (nor arrive after asyncio.run removed handlers).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    log.info("stopping: draining %d stream(s)", len(daemon.pumps))
    await daemon.drain(DRAIN_SECONDS)
    await daemon.stop()
    return EXIT_OK


def _run(main: Awaitable[int]) -> int:
    try:
        return asyncio.run(main)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return EXIT_OK


def _settings(
    prog: str,
    load: Callable[[list[str]], Values],
    build: Callable[[Values], Any],
    args: list[str],
    worker: Optional[int] = None,
) -> Any:
    """Settings from ``args`` (None after printing the one-line error), then logging and the
    event loop as they say."""
    try:
        settings = build(load(args))
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None
    setup_logging(settings.log_format, settings.log_level, worker)
    log.info("%s %s starting (%s)", prog, __version__, use_uvloop(not settings.no_uvloop))
    return settings


def exit_main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        place = _group_place()
    except ValueError as exc:
        print(f"relay-exit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    worker = place.index if place is not None else None
    settings = _settings("relay-exit", load_exit_config, ExitSettings.from_values, args, worker)
    if settings is None:
        return EXIT_USAGE
    if place is None and settings.workers > 1:
        from relay.exit.supervisor import supervise

        return supervise(args, settings)
    if place is not None:
        settings.share(place.processes)

    async def serve() -> int:
        # Built inside the running loop, which is what its asyncio objects bind to.
        daemon = RelayExit(settings, place=place)

        def reload() -> None:
            """SIGHUP: re-read keys, policy and TLS certificate; a bad file keeps the old ones."""
            notify("RELOADING=1")
            try:
                fresh = ExitSettings.from_values(load_exit_config(args))
            except ConfigError as exc:
                log.error("reload refused, old configuration stays: %s", exc)
            else:
                daemon.reload(fresh.secrets, fresh.policy, fresh.tls, fresh.tls_fingerprint)
            notify("READY=1")

        return await _serve(daemon, reload, daemon.group)

    return _run(serve())


def _group_place() -> Optional[GroupPlace]:
    """This process's place in a --workers group (None: not in one)."""
    text = os.environ.pop(GROUP_ENV, None)
    return None if text is None else GroupPlace.from_env(text)


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        from relay.tools.check import check_main

        return check_main(args[1:])
    settings = _settings("relay-worker", load_worker_config, WorkerSettings.from_values, args)
    if settings is None:
        return EXIT_USAGE

    async def serve() -> int:
        # Built inside the running loop, which is what its asyncio objects bind to.
        return await _serve(RelayWorker(settings), None)

    return _run(serve())


USAGE = """usage: relay COMMAND [ARGS...]

commands:
  check     walk the worker's chain hop by hop (--config worker.toml [--probe HOST:PORT])
  demo      the whole chain on loopback, through an idle-killing middlebox
  exit      run relay-exit (same as the relay-exit command)
  worker    run relay-worker (same as the relay-worker command)
  version   print the version
"""


def relay_main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command == "exit":
        return exit_main(rest)
    if command == "worker":
        return worker_main(rest)
    if command == "demo":
        from relay.tools.demo import main as demo_main

        return demo_main(rest)
    if command == "check":
        from relay.tools.check import check_main

        return check_main(rest)
    if command in ("version", "--version"):
        print(__version__)
        return EXIT_OK
    print(f"relay: error: unknown command {command!r}\n{USAGE}", end="", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(relay_main())

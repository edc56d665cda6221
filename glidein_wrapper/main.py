"""``glidein-wrapper``: the relay, the readiness gate, COMMAND, and the order they stop in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from glidein_wrapper import EXIT_FAILED, EXIT_TEMPFAIL, EXIT_USAGE, condor, proxychains
from glidein_wrapper.options import UsageError, WrapperOptions, parse_args
from glidein_wrapper.ready import AttachedCheck, Check, InProcessCheck, NotReady, wait_ready
from glidein_wrapper.rundir import make_run_dir, new_credentials, remove_run_dir, write_private
from glidein_wrapper.supervisor import Signals, run_command, signal_name, status_lines
from relay import __version__
from relay.config.loading import load_worker_config
from relay.config.secrets import load_userpass
from relay.errors import ConfigError
from relay.logs import setup_logging
from relay.metrics import Metrics
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on old interpreters only
    import tomli as tomllib

log = logging.getLogger("glidein_wrapper")

PROG = "glidein-wrapper"


class Fatal(Exception):
    """Stop before COMMAND starts; ``code`` is the wrapper's exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Plan:
    """Everything decided before the event loop starts."""

    def __init__(self, opts: WrapperOptions, run_dir: Path) -> None:
        self.opts = opts
        self.run_dir = run_dir
        self.preload = ""
        self.credentials = ("", "")
        self.settings: Optional[WorkerSettings] = None
        self.log_format = "text"
        self.log_level = "info"
        self.uvloop = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_dir = make_run_dir(opts.run_dir)
    except OSError as exc:
        print(f"{PROG}: error: cannot make the run directory: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        plan = _prepare(opts, run_dir)
        setup_logging(plan.log_format, plan.log_level)
        _use_uvloop(plan.uvloop)
        log.info("%s %s starting", PROG, __version__, extra={"fields": {"run_dir": run_dir}})
        return asyncio.run(_run(plan))
    except Fatal as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    finally:
        remove_run_dir(run_dir)


def _prepare(opts: WrapperOptions, run_dir: Path) -> Plan:
    """Credentials, the worker's settings and the interposer library, or a Fatal error."""
    plan = Plan(opts, run_dir)
    try:
        plan.preload = proxychains.find_preload(opts.preload, must_exist=not opts.container_env)
    except proxychains.PreloadMissing as exc:
        raise Fatal(EXIT_USAGE, str(exc)) from None
    try:
        if opts.attach is not None:
            assert opts.attach_auth is not None
            plan.credentials = load_userpass(opts.attach_auth, "--attach-auth")
            return plan
        assert opts.config is not None
        plan.credentials = new_credentials()
        user, password = plan.credentials
        auth = write_private(run_dir / "socks.auth", f"{user}:{password}\n")
        settings = WorkerSettings.from_values(load_worker_config(_worker_argv(opts, auth)))
    except ConfigError as exc:
        raise Fatal(EXIT_USAGE, str(exc)) from None
    plan.settings = settings
    plan.log_format, plan.log_level = settings.log_format, settings.log_level
    plan.uvloop = not settings.no_uvloop
    return plan


def _worker_argv(opts: WrapperOptions, auth: Path) -> list[str]:
    """The worker's configuration: the operator's file, with this run's local credentials.

    The local listeners pick free loopback ports unless the file names them: the address
    reaches COMMAND through the environment, and a fixed port could collide with another
    glidein on the same node.
    """
    assert opts.config is not None
    argv = ["--config", str(opts.config), "--socks-auth", str(auth)]
    keys = _worker_keys(opts.config)
    if "socks" not in keys:
        argv += ["--socks", "127.0.0.1:0"]
    if "http" not in keys and opts.http:
        argv += ["--http", "127.0.0.1:0"]
    return argv


def _worker_keys(path: Path) -> set[str]:
    """Keys of the file's [worker] table (empty if unreadable: the loader reports that)."""
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle).get("worker", {})
    except (OSError, ValueError):
        return set()
    return set(table) if isinstance(table, dict) else set()


def _use_uvloop(enabled: bool) -> None:
    if enabled:
        try:
            import uvloop
        except ImportError:
            return
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run(plan: Plan) -> int:
    signals = Signals()
    signals.install()
    worker: Optional[RelayWorker] = None
    try:
        if plan.settings is not None:
            worker = RelayWorker(plan.settings)
            try:
                await worker.start()
            except OSError as exc:
                raise Fatal(EXIT_FAILED, f"cannot start the relay worker: {exc}") from None
        return await _gate_and_supervise(plan, worker, signals)
    finally:
        signals.uninstall()
        if worker is not None:
            await worker.stop()


async def _gate_and_supervise(plan: Plan, worker: Optional[RelayWorker], signals: Signals) -> int:
    opts = plan.opts
    check: Check
    if worker is not None:
        check = InProcessCheck(worker, opts.probes)
    else:
        assert opts.attach is not None
        check = AttachedCheck(opts.attach, plan.credentials, opts.probes)
    gate = asyncio.ensure_future(wait_ready(check, opts.ready_timeout))
    interrupted = asyncio.ensure_future(signals.arrived.wait())
    await asyncio.wait([gate, interrupted], return_when=asyncio.FIRST_COMPLETED)
    if not gate.done():
        gate.cancel()
        with contextlib.suppress(asyncio.CancelledError, NotReady):
            await gate
        interrupted.cancel()
        signum = signals.received[0]
        log.info("%s before COMMAND started: not starting it", signal_name(signum))
        return 128 + signum
    interrupted.cancel()
    try:
        took = gate.result()
    except NotReady as exc:
        when = "(refused; not retried)" if exc.final else f"after {opts.ready_timeout:g} s"
        raise Fatal(
            EXIT_TEMPFAIL,
            f"chain not ready {when}; failing hop: {exc.hop} ({exc.why}); COMMAND not started",
        ) from None
    log.info(
        "chain ready", extra={"fields": {"seconds": round(took, 3), "probes": len(opts.probes)}}
    )
    env = _command_env(plan, worker)
    status_task = asyncio.ensure_future(
        status_lines(opts.status_interval, lambda: _describe(worker))
    )
    try:
        status = await run_command(opts.command, env, signals)
    finally:
        status_task.cancel()
    if worker is not None:
        await _drain(worker, opts.drain_timeout, signals)
    return status


def _command_env(plan: Plan, worker: Optional[RelayWorker]) -> dict[str, str]:
    """COMMAND's environment: ours, plus the interposer, the proxies and HTCondor's settings."""
    opts = plan.opts
    user, password = plan.credentials
    if worker is not None:
        socks = worker.address
        http = worker.listeners.http_address
        timeout = worker.settings.connect_timeout + 10
    else:
        assert opts.attach is not None
        socks, http, timeout = (opts.attach.host, opts.attach.port), None, 30.0
    try:
        text = proxychains.render_config(
            socks[0], socks[1], user, password, opts.direct, opts.remote_dns, timeout
        )
    except ValueError as exc:
        raise Fatal(EXIT_USAGE, f"--attach-auth: {exc}") from None
    config = write_private(plan.run_dir / "proxychains.conf", text)
    snippet = write_private(
        plan.run_dir / condor.SNIPPET_NAME, condor.render_snippet(opts.drone_uuid)
    )
    ours = proxychains.proxy_env(
        preload=plan.preload,
        config=config,
        socks=socks,
        user=user,
        password=password,
        http=http,
        direct=opts.direct,
        proxy_variables=opts.proxy_env,
    )
    ours.update(condor.condor_env(opts.drone_uuid))
    ours[condor.SNIPPET_VARIABLE] = str(snippet)
    if opts.container_env:
        ours.update(proxychains.container_env(ours))
    env = dict(os.environ)
    env.update(ours)
    log.info(
        "COMMAND environment",
        extra={
            "fields": {
                "preload": plan.preload,
                "socks": f"{socks[0]}:{socks[1]}",
                "http": f"{http[0]}:{http[1]}" if http else "-",
                "direct": ",".join(str(n) for n in opts.direct) or "-",
                "drone_uuid": opts.drone_uuid or "-",
            }
        },
    )
    return env


async def _drain(worker: RelayWorker, timeout: float, signals: Signals) -> None:
    """Stop accepting and let open streams finish, up to ``timeout`` or another signal."""
    streams = len(worker.pumps)
    if streams:
        log.info("draining %d stream(s) for up to %g s", streams, timeout)
    already = len(signals.received)
    signals.arrived.clear()
    drain = asyncio.ensure_future(worker.drain(timeout))
    interrupted = asyncio.ensure_future(signals.arrived.wait())
    await asyncio.wait([drain, interrupted], return_when=asyncio.FIRST_COMPLETED)
    for task in (drain, interrupted):
        task.cancel()
    if len(signals.received) > already:
        log.info("signal during drain: stopping now")


def _describe(worker: Optional[RelayWorker]) -> dict[str, object]:
    """The numbers of a status line, from the worker's own metrics."""
    if worker is None:
        return {"relay": "attached"}
    metrics = worker.metrics
    return {
        "streams_open": int(_sample(metrics, "relay_streams_active")),
        "streams_total": int(_sample(metrics, "relay_streams_total")),
        "bytes_up": int(_sample(metrics, "relay_bytes_total", direction="up")),
        "bytes_down": int(_sample(metrics, "relay_bytes_total", direction="down")),
        "reconnects": int(_sample(metrics, "relay_reconnects_total")),
        "ssh": "up" if worker.ssh is not None and worker.ssh.connected else "down",
    }


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total

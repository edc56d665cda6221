"""COBalD/TARDIS driving the lab's Slurm: configs shaped like deploy/tardis, and the daemon.

TARDIS decides when glidein jobs are submitted, polled and cancelled, so glidein.sbatch is run
by the real daemon (cobald 0.14, cobald-tardis 0.9) rather than by hand. HTCondor is replaced
by TARDIS's FakeBatchSystem, which reports every running job as an available, fully used
machine; a file-driven controller (:class:`FileDemand`) sets how many drones TARDIS keeps, so a
test can start drones and later have TARDIS drain them without restarting the daemon.

The daemon runs in its own interpreter (a venv with cobald and cobald-tardis); the test only
writes files, spawns it and reads its SqliteRegistry. This module imports nothing outside the
standard library at import time, because the daemon imports it to load :class:`FileDemand`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar, Union

from tests.support.proc import descendants, terminate

__all__ = [
    "ACTIVE_STATES",
    "MACHINE_TYPE",
    "SITE",
    "Drone",
    "FileDemand",
    "LabTardis",
    "Spawn",
    "SshExecutor",
    "TardisDaemon",
    "TardisLabError",
    "Timings",
    "read_registry",
    "write_configs",
    "write_demand",
]

SITE = "lab"  # drone uuids are "lab-<10 hex digits>"
MACHINE_TYPE = "cpu_node"
REPO = Path(__file__).resolve().parents[2]

#: States in which a drone's Slurm job is queued or running and TARDIS wants it.
ACTIVE_STATES = frozenset({"BootingState", "IntegrateState", "IntegratingState", "AvailableState"})

#: "Drone {... 'drone_uuid': 'lab-0123456789' ...} in BootingState" (dronestates.py, INFO).
_STATE_LINE = re.compile(r"'drone_uuid': '(?P<uuid>[\w.-]+)'.*\} in (?P<state>\w+State)\s*$")

T = TypeVar("T")


class TardisLabError(RuntimeError):
    """The daemon failed or a wait ran out; the message carries drones and the log tail."""


@dataclass(frozen=True)
class Timings:
    """Timing knobs; the defaults keep a start-run-drain cycle well under a minute."""

    #: drone_heartbeat_interval (s, int): pause between two runs of a drone's state machine.
    heartbeat: int = 1
    #: bulk_delay (s): window in which squeue calls of all drones are merged into one.
    bulk_delay: float = 0.5
    #: How often FileDemand reads the demand file (s).
    demand_interval: float = 1.0
    #: FactoryPool interval (s) between starting/releasing drones; None keeps TARDIS's 30.
    pool_interval: Optional[float] = 2.0
    #: drone_minimum_lifetime (s): a drone Available for longer than this is drained (and
    #: replaced while the demand lasts); None: never.
    minimum_lifetime: Optional[int] = None


@dataclass(frozen=True)
class SshExecutor:
    """Parameters for TARDIS's SSHExecutor (passed to asyncssh.connect)."""

    host: str
    port: int
    username: str
    client_keys: Sequence[str]
    known_hosts: str


@dataclass(frozen=True)
class LabTardis:
    """Where write_configs put things."""

    directory: Path
    cobald_yml: Path
    tardis_yml: Path
    db_file: Path
    demand_file: Path
    log_file: Path
    cores: int


def _q(value: Any) -> str:
    """A YAML scalar: JSON's quoting is valid YAML and leaves no room for surprises."""
    return json.dumps(value)


def write_demand(path: Path, drones: int) -> None:
    """Replace the demand file atomically so FileDemand never reads half a number."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{drones}\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def write_configs(
    directory: Path,
    *,
    startup_command: Union[str, Path],
    partition: str,
    walltime: int,
    cores: int,
    memory: float,
    disk: float,
    drones: int,
    max_drones: Optional[int] = None,
    executor: Union[str, SshExecutor] = "shell",
    db_file: Optional[Path] = None,
    submit_options: Optional[Mapping[str, str]] = None,
    timings: Timings = Timings(),
    owner: Optional[tuple[int, int]] = None,
    log_level: str = "INFO",
) -> LabTardis:
    """Write cobald.yml, tardis.yml and the demand file (drones wanted) into directory.

    The structure follows deploy/tardis (site adapter Slurm, MachineTypes,
    MachineTypeConfiguration, MachineMetaData, SqliteRegistry, Limiter, Logger); the
    LinearController is replaced by FileDemand and HTCondor by FakeBatchSystem. memory and
    disk are in GB as in deploy/tardis/tardis.yml; walltime in minutes; submit_options are
    extra long sbatch options (e.g. {"output": ".../glidein-%j.log"}). owner (uid, gid) gets
    the directory, so the daemon running as that user can write the registry and its log.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    max_drones = drones if max_drones is None else max_drones
    db_file = Path(db_file) if db_file is not None else directory / "drone_registry.db"
    lab = LabTardis(
        directory=directory,
        cobald_yml=directory / "cobald.yml",
        tardis_yml=directory / "tardis.yml",
        db_file=db_file,
        demand_file=directory / "demand",
        log_file=directory / "cobald.log",
        cores=cores,
    )

    pipeline = [
        "logging:",
        "  version: 1",
        "  formatters:",
        "    lab:",
        f"      format: {_q('%(asctime)s %(levelname)s %(name)s: %(message)s')}",
        "  handlers:",
        "    file:",
        "      class: logging.FileHandler",
        f"      filename: {_q(str(lab.log_file))}",
        "      formatter: lab",
        "  root:",
        f"    level: {log_level}",
        "    handlers: [file]",
        "",
        "pipeline:",
        "  # Demand in drones, read from a file (the lab's stand-in for the LinearController).",
        "  - __type__: tests.support.tardis.FileDemand",
        f"    path: {_q(str(lab.demand_file))}",
        f"    cores: {cores}",
        f"    interval: {timings.demand_interval}",
    ]
    if timings.pool_interval is not None:
        pipeline.append(f"    pool_interval: {timings.pool_interval}")
    pipeline += [
        "  - !Limiter",
        "    minimum: 0",
        f"    maximum: {max_drones * cores}",
        "  - !Logger",
        "    name: 'changes'",
        "  - !TardisPoolFactory",
        f"    configuration: {_q(str(lab.tardis_yml))}",
    ]
    lab.cobald_yml.write_text("\n".join(pipeline) + "\n")

    if executor == "shell":
        executor_lines = ["  executor: !ShellExecutor {}"]
    elif isinstance(executor, SshExecutor):
        executor_lines = [
            "  executor: !SSHExecutor",
            f"    host: {_q(executor.host)}",
            f"    port: {executor.port}",
            f"    username: {_q(executor.username)}",
            "    client_keys:",
            *(f"      - {_q(str(key))}" for key in executor.client_keys),
            f"    known_hosts: {_q(str(executor.known_hosts))}",
        ]
    else:
        raise ValueError(f"executor must be 'shell' or an SshExecutor, not {executor!r}")

    site = [
        f"  - name: {SITE}",
        "    adapter: Slurm",
        f"    quota: {max_drones * cores}",
        f"    drone_heartbeat_interval: {timings.heartbeat}",
    ]
    if timings.minimum_lifetime is not None:
        site.append(f"    drone_minimum_lifetime: {timings.minimum_lifetime}")
    long_options = dict(submit_options or {})
    submit = ["      SubmitOptions:", "        long:"] if long_options else []
    submit += [f"          {name}: {_q(value)}" for name, value in long_options.items()]
    tardis = [
        "Plugins:",
        "  SqliteRegistry:",
        f"    db_file: {_q(str(db_file))}",
        "",
        "# Stands in for HTCondor: every running job is an available, fully used machine.",
        "BatchSystem:",
        "  adapter: FakeBatchSystem",
        "  allocation: 1.0",
        "  utilisation: 1.0",
        "  machine_status: Available",
        "",
        "Sites:",
        *site,
        "",
        f"{SITE}:",
        *executor_lines,
        "  # squeue/sbatch calls of all drones issued within bulk_delay seconds are merged.",
        f"  bulk_delay: {timings.bulk_delay}",
        "  MachineTypes:",
        f"    - {MACHINE_TYPE}",
        "  MachineTypeConfiguration:",
        f"    {MACHINE_TYPE}:",
        f"      Walltime: {_q(str(walltime))}",
        f"      Partition: {_q(partition)}",
        f"      StartupCommand: {_q(str(startup_command))}",
        *submit,
        "  MachineMetaData:",
        f"    {MACHINE_TYPE}:",
        f"      Cores: {cores}",
        f"      Memory: {memory}",
        f"      Disk: {disk}",
    ]
    lab.tardis_yml.write_text("\n".join(tardis) + "\n")
    write_demand(lab.demand_file, drones)
    for path in (lab.cobald_yml, lab.tardis_yml):
        path.chmod(0o644)
    if owner is not None:
        os.chown(directory, *owner)
        directory.chmod(0o755)
    return lab


# --------------------------------------------------------------------------- in the daemon


def _as_cobald_service(cls: type[T]) -> type[T]:
    """Register cls as a COBalD service where COBalD is installed (the daemon), else keep it."""
    try:
        from cobald.daemon import service
    except ImportError:
        return cls
    decorated: type[T] = service(flavour=asyncio)(cls)
    return decorated


@_as_cobald_service
class FileDemand:
    """COBalD controller: wants as many drones as the demand file says.

    Loaded by COBalD from cobald.yml (``__type__: tests.support.tardis.FileDemand``, with the
    repository on PYTHONPATH). pool_interval shortens TARDIS's FactoryPool interval (30 s),
    which otherwise dominates how long starting and draining drones takes.
    """

    def __init__(
        self,
        target: Any,
        path: str,
        cores: int,
        interval: float = 1.0,
        pool_interval: Optional[float] = None,
    ) -> None:
        self.target = target
        self.path = Path(path)
        self.cores = cores
        self.interval = interval
        self._applied: Optional[int] = None
        self._log = logging.getLogger("cobald.runtime.lab.filedemand")
        if pool_interval is not None:
            for pool in _factory_pools(target):
                pool.interval = pool_interval

    def regulate(self) -> None:
        try:
            drones = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError) as err:
            self._log.warning("demand file %s unreadable: %s", self.path, err)
            return
        if drones != self._applied:
            self._log.info("demand: %d drones", drones)
            self.target.demand = drones * self.cores
            self._applied = drones

    async def run(self) -> None:
        while True:
            self.regulate()
            await asyncio.sleep(self.interval)


def _factory_pools(pool: Any) -> Iterator[Any]:
    """The FactoryPools below pool (through decorators' target and composites' children)."""
    from cobald.composite.factory import FactoryPool

    todo = [pool]
    while todo:
        item = todo.pop()
        if isinstance(item, FactoryPool):
            yield item
            continue
        target = getattr(item, "target", None)
        if target is not None:
            todo.append(target)
        todo.extend(getattr(item, "children", ()))


# --------------------------------------------------------------------------- in the test


class Spawn(Protocol):
    """Starts argv (in the login namespace, as the submitting user) and returns its Popen."""

    def __call__(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str
    ) -> subprocess.Popen[Any]: ...


@dataclass(frozen=True)
class Drone:
    """One row of TARDIS's SqliteRegistry."""

    uuid: str
    state: str
    job_id: Optional[str]  # remote_resource_uuid: the Slurm job id (None before sbatch returned)
    created: str
    updated: str


_DRONES_SQL = """
SELECT R.drone_uuid, RS.state, R.remote_resource_uuid, R.created, R.updated
FROM Resources R JOIN ResourceStates RS ON R.state_id = RS.state_id
ORDER BY R.id
"""


def _registry_rows(db_file: Path) -> list[list[Any]]:
    if not db_file.exists():
        return []
    uri = f"file:{db_file}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=5)
    except sqlite3.OperationalError:
        return []
    try:
        return [list(row) for row in con.execute(_DRONES_SQL).fetchall()]
    except sqlite3.OperationalError as err:  # schema not there yet
        if "no such table" in str(err):
            return []
        raise
    finally:
        con.close()


_READER = """
import json, sqlite3, sys
from pathlib import Path
SQL = {sql!r}
db = Path(sys.argv[1])
rows = []
if db.exists():
    con = sqlite3.connect(f"file:{{db}}?mode=ro", uri=True, timeout=5)
    try:
        rows = [list(r) for r in con.execute(SQL).fetchall()]
    except sqlite3.OperationalError as err:
        if "no such table" not in str(err):
            raise
    finally:
        con.close()
print(json.dumps(rows))
"""


def read_registry(db_file: Path, as_user: Optional[Sequence[str]] = None) -> list[Drone]:
    """Drones in the registry, opened read-only so a test never writes the daemon's database.

    The registry is in WAL mode: a reader creates the -wal and -shm files when the daemon has
    none open, and files root made would leave the daemon's user a read-only database. So
    give as_user (a command prefix, e.g. setpriv and that user's python) when the daemon runs
    as someone else. TARDIS deletes a drone's row when it reaches DownState.
    """
    if as_user:
        code = _READER.format(sql=_DRONES_SQL)
        result = subprocess.run(
            [*as_user, "-c", code, str(db_file)], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise TardisLabError(f"reading {db_file} failed: {result.stderr.strip()}")
        rows = json.loads(result.stdout)
    else:
        rows = _registry_rows(db_file)
    return [
        Drone(
            uuid=str(uuid),
            state=str(state),
            job_id=None if job is None else str(job),
            created=str(created),
            updated=str(updated),
        )
        for uuid, state, job, created, updated in rows
    ]


@dataclass
class TardisDaemon:
    """``python -m cobald.daemon cobald.yml`` for a LabTardis, plus ways to watch its drones.

    python is an interpreter with cobald==0.14.0 and cobald-tardis==0.9.0; env is added to a
    minimal environment (give SLURM_CONF, and PATH if sbatch is not in /usr/bin).
    """

    lab: LabTardis
    spawn: Spawn
    python: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Command prefix that runs the daemon's python as the daemon's user (see read_registry).
    reader: Optional[Sequence[str]] = None
    proc: Optional[subprocess.Popen[Any]] = None
    #: Every state seen per drone uuid by drones(), in order (history() has all of them).
    seen: dict[str, list[str]] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [
            self.python,
            "-m",
            "cobald.daemon",
            str(self.lab.cobald_yml),
            "--log-target",
            str(self.lab.log_file),
        ]

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.lab.directory),
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore",
        }
        env.update(self.env)
        return env

    def start(self) -> TardisDaemon:
        if self.proc is not None and self.proc.poll() is None:
            raise TardisLabError("daemon already running")
        self.proc = self.spawn(self.argv(), env=self.environment(), cwd=str(self.lab.directory))
        return self

    def __enter__(self) -> TardisDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def set_drones(self, drones: int) -> None:
        """Change the demand; TARDIS starts or drains drones at its next FactoryPool tick.

        While no drone is Available, a lower demand releases nothing: TARDIS's FactoryPool only
        shrinks when supply (cores of Available drones) exceeds the demand.
        """
        write_demand(self.lab.demand_file, drones)

    def drones(self) -> list[Drone]:
        drones = read_registry(self.lab.db_file, self.reader)
        for drone in drones:
            states = self.seen.setdefault(drone.uuid, [])
            if not states or states[-1] != drone.state:
                states.append(drone.state)
        return drones

    def log_text(self) -> str:
        try:
            return self.lab.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def history(self) -> dict[str, list[str]]:
        """Each drone's states in order, from the daemon's log (complete, unlike polling)."""
        out: dict[str, list[str]] = {}
        for line in self.log_text().splitlines():
            m = _STATE_LINE.search(line)
            if m:
                states = out.setdefault(m["uuid"], [])
                if not states or states[-1] != m["state"]:
                    states.append(m["state"])
        return out

    def describe(self, lines: int = 40) -> str:
        rows = read_registry(self.lab.db_file, self.reader)
        drones = "\n".join(f"  {d}" for d in rows) or "  (none)"
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        status = "running" if self.running() else f"exited {self.proc and self.proc.returncode}"
        return f"daemon {status}\ndrones:\n{drones}\nlog tail:\n{tail}"

    def _until(self, check: Callable[[], Optional[T]], timeout: float, what: str) -> T:
        """Poll check until it returns something; fail early if the daemon dies."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result is not None:
                return result
            if self.proc is not None and self.proc.poll() is not None:
                raise TardisLabError(f"daemon exited while waiting for {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise TardisLabError(f"timed out after {timeout} s: {what}\n{self.describe()}")
            time.sleep(0.5)

    def wait_for(
        self, predicate: Callable[[list[Drone]], bool], timeout: float, what: str = "condition"
    ) -> list[Drone]:
        """Wait until predicate(registry rows) holds."""

        def check() -> Optional[list[Drone]]:
            drones = self.drones()
            return drones if predicate(drones) else None

        return self._until(check, timeout, what)

    def wait_history(
        self,
        predicate: Callable[[dict[str, list[str]]], bool],
        timeout: float,
        what: str = "condition",
    ) -> dict[str, list[str]]:
        """Wait until predicate(history()) holds: for states too short-lived to be polled."""

        def check() -> Optional[dict[str, list[str]]]:
            self.drones()
            history = self.history()
            return history if predicate(history) else None

        return self._until(check, timeout, what)

    def wait_states(
        self, count: int, states: Union[str, Sequence[str]], timeout: float
    ) -> list[Drone]:
        """Wait until exactly count drones exist and all are in one of states."""
        wanted = {states} if isinstance(states, str) else set(states)
        return self.wait_for(
            lambda ds: len(ds) == count and all(d.state in wanted for d in ds),
            timeout,
            f"{count} drones in {sorted(wanted)}",
        )

    def wait_gone(self, uuids: Sequence[str], timeout: float) -> list[Drone]:
        """Wait until none of these drones is left in the registry (all reached DownState)."""
        gone = set(uuids)
        return self.wait_for(
            lambda ds: not gone & {d.uuid for d in ds}, timeout, f"drones {sorted(gone)} gone"
        )

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM the daemon (and what it started), SIGKILL what is left after timeout.

        Slurm jobs are left alone: TARDIS restores the drones from the registry on restart.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            terminate(pids=descendants(proc.pid), popens=[proc], timeout=timeout)
        return proc.returncode

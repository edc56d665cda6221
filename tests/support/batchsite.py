"""A site whose compute nodes run glideins as Slurm batch jobs, the relay installed as a site
installs it: the namespaces of tests/support/site.py, OpenSSH on the login node, a real Slurm
(tests/support/slurm.py), relay-exit and the pool's stand-in servers outside.

Everything a job uses lives in RELAY_HOME, a directory every node sees (as a project space
would be), owned by the unprivileged user who submits the jobs:

    RELAY_HOME/venv            made by deploy/jureca/install-relay.sh, run as that user with the
                               site's python3, installing the wheel of this checkout
    RELAY_HOME/etc/            worker.toml and the relay's key, secret and known_hosts
    RELAY_HOME/glidein.sbatch  deploy/jureca/glidein.sbatch with only its site values changed
    RELAY_HOME/logs, reports   the jobs' output and the stand-in glideins' reports

Outside the firewall: the exit, a "collector" and a "shadow" (line echo) and the stage-out
server (tests/support/glidein_standin.py serve), all on the sink address.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from tests.support.relays import KEY_ID, SECRET, Daemon, start_exit, write_config
from tests.support.site import Site
from tests.support.slurm import UNPRIVILEGED, SlurmCluster, as_user
from tests.support.sshd import Sshd, start_sshd
from tests.support.tardis import TardisDaemon, write_configs

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "deploy" / "jureca" / "glidein.sbatch"
INSTALL = REPO / "deploy" / "jureca" / "install-relay.sh"
STANDIN = Path(__file__).with_name("glidein_standin.py")
COLLECTOR_PORT = 9618
SHADOW_PORT = 9700
STAGE_OUT_PORT = 9800
PROXYCHAINS_LIB = "/usr/lib/x86_64-linux-gnu/libproxychains.so.4"
# COBalD/TARDIS as deploy/tardis/README.md names them; they need Python >= 3.10 and pull in
# about 80 packages, so their venv is made once per machine and shared by every test run.
TARDIS_PACKAGES = ("cobald==0.14.0", "cobald-tardis==0.9.0")
TARDIS_VENV = Path("/var/tmp/hpc-relay-tests/cobald-tardis-0.9.0")
SITE_BLOCK = re.compile(r"^# =+ site-specific values.*?^# =+\n", re.M | re.S)

__all__ = ["BatchSite", "sbatch_site_copy", "site_python"]


def site_python(user: str = UNPRIVILEGED, minimum: tuple[int, int] = (3, 9)) -> str:
    """The system's python3 with venv that `user` can run (pyenv's sit under root's home)."""
    candidates = sorted(Path("/usr/bin").glob("python3.*"), reverse=True)
    for path in [Path("/usr/bin/python3"), *candidates]:
        if not re.fullmatch(r"python3(\.\d+)?", path.name):
            continue
        probe = f"import sys, venv, ensurepip; assert sys.version_info >= {minimum!r}"
        argv = [*as_user(user), str(path), "-c", probe]  # fmt: skip
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return str(path)
    raise RuntimeError(
        f"no python3 >= {minimum[0]}.{minimum[1]} with venv that {user} can run"
        " (install python3-venv)"
    )


def tardis_python(user: str = UNPRIVILEGED) -> str:
    """The interpreter of a venv with COBalD/TARDIS that `user` can run; made on first use."""
    python = TARDIS_VENV / "bin" / "python"
    done = TARDIS_VENV / ".complete"
    TARDIS_VENV.parent.mkdir(parents=True, exist_ok=True)
    TARDIS_VENV.parent.chmod(0o755)
    with open(TARDIS_VENV.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(TARDIS_VENV, ignore_errors=True)
            base = site_python(user, (3, 10))
            subprocess.run([base, "-m", "venv", str(TARDIS_VENV)], check=True, timeout=300)
            pip = [str(python), "-m", "pip", "install", "-q", *TARDIS_PACKAGES]
            result = subprocess.run(pip, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise RuntimeError(f"installing {TARDIS_PACKAGES} failed:\n{result.stderr}")
            subprocess.run(["chmod", "-R", "a+rX", str(TARDIS_VENV)], check=True)
            done.touch()
    return str(python)


def sbatch_site_copy(values: dict[str, str], source: Path = SBATCH) -> str:
    """glidein.sbatch with `NAME=...` lines of its site-specific block replaced by values
    (bash source text); nothing outside that block changes."""
    text = source.read_text()
    block = SITE_BLOCK.search(text)
    if block is None:
        raise ValueError(f"{source}: no site-specific block")
    body = block.group(0)
    for name, value in values.items():
        pattern = re.compile(rf"^{name}=.*$", re.M)
        if not pattern.search(body):
            raise KeyError(f"{source}: no site value {name}")
        line = f"{name}={value}"
        body = pattern.sub(lambda _, line=line: line, body, count=1)  # type: ignore[misc]
    return text[: block.start()] + body + text[block.end() :]


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


class BatchSite:
    """Build with BatchSite.create(); close() ends every process and namespace it started."""

    def __init__(self, nodes: int, idle_timeout: float, user: str) -> None:
        self.user = user
        self.top = Path(tempfile.mkdtemp(prefix="hr-batch-"))
        self.top.chmod(0o755)  # the job's user must reach RELAY_HOME below it
        self.nodes = nodes
        self.idle_timeout = idle_timeout
        self.site: Site = None  # type: ignore[assignment]  # made by _build()
        self.home = self.top / "relay-home"
        self.slurm: Optional[SlurmCluster] = None
        self.sshd: Optional[Sshd] = None
        self.exit: Optional[Daemon] = None

    @classmethod
    def create(cls, nodes: int = 2, idle_timeout: float = 4, user: str = UNPRIVILEGED,
               wheel: Optional[Path] = None) -> BatchSite:  # fmt: skip
        batch = cls(nodes, idle_timeout, user)
        try:
            batch._build(wheel)
        except BaseException:
            batch.close()
            raise
        return batch

    def _build(self, wheel: Optional[Path]) -> None:
        self.site = site = Site.create(self.top / "site", workers=self.nodes, logins=1,
                                       exits=2, idle_timeout=self.idle_timeout)  # fmt: skip
        self.sink = site.sink_ip
        self.exit_address = f"{site.exit_ips[0]}:80"
        # Nothing listens there: the login node's connect is refused.
        self.dead_exit_address = f"{site.exit_ips[1]}:80"
        self.sshd = start_sshd(self.top / "sshd", host=site.login_ips[0], port=22,
                               netns=site.logins[0])  # fmt: skip
        self.exit = start_exit(
            site, self.top / "exit", host=site.exit_ips[0], port=80,  # type: ignore[arg-type]
            allow=(f"{self.sink}/32:*",), heartbeat=1.0,
        )  # fmt: skip
        for port in (COLLECTOR_PORT, SHADOW_PORT):
            site.start_echo_server(site.outside, self.sink, port)
        self.staged = self.top / "staged"
        self.staged.mkdir()
        store = site.spawn(site.outside, [sys.executable, str(STANDIN), "serve", "--listen",
                           f"{self.sink}:{STAGE_OUT_PORT}", "--dir", str(self.staged)])  # fmt: skip
        site.wait_listening(site.outside, STAGE_OUT_PORT, proc=store)
        self._install(wheel)
        self.slurm = SlurmCluster(site, self.top / "slurm").start()

    # ---------------------------------------------------------------------------- install

    def _install(self, wheel: Optional[Path]) -> None:
        """RELAY_HOME as deploy/jureca/README.md has an operator make it, as the job's user."""
        home = self.home
        home.mkdir()
        for sub in ("logs", "reports", "pip-home", "scratch"):
            (home / sub).mkdir()
        if wheel is None:
            wheel = build_wheel(self.top / "dist")
        _chown(home, self.user)
        # The user may not reach the checkout (a private directory): run a copy, as a site
        # runs the script it downloaded.
        install = self.top / INSTALL.name
        shutil.copy(INSTALL, install)
        install.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
        env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=str(home / "pip-home"),
                   PYTHON=site_python(self.user))  # fmt: skip
        argv = [*as_user(self.user), "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                "bash", str(install), str(home), str(wheel)]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"install-relay.sh failed:\n{result.stdout}\n{result.stderr}")
        self.install_output = result.stdout + result.stderr
        # The operator's part: the relay's key and the worker's configuration in etc/ (0700).
        etc = home / "etc"
        assert self.sshd is not None
        shutil.copy(self.sshd.client_key, etc / "relay_ed25519")
        shutil.copy(self.sshd.known_hosts, etc / "known_hosts")
        (etc / "exit.secret").write_text(SECRET + "\n")
        (etc / "wrong.secret").write_text("not-the-secret-" + SECRET + "\n")
        self.write_worker_config("worker.toml")
        self.write_worker_config("worker-wrong-key.toml", secret_file=str(etc / "wrong.secret"))
        self.write_worker_config("worker-dead-exit.toml", exit=[self.dead_exit_address])
        shutil.copy(STANDIN, home / "glidein_standin.py")
        for path in etc.iterdir():
            path.chmod(0o600)
        _chown(home, self.user)

    def write_worker_config(self, name: str, **overrides: Any) -> Path:
        assert self.sshd is not None
        etc = self.home / "etc"
        values: dict[str, Any] = {
            "login": [f"{self.sshd.user}@{self.sshd.host}:22"],
            "ssh_key": str(etc / "relay_ed25519"),
            "known_hosts": str(etc / "known_hosts"),
            "exit": [self.exit_address],
            "key_id": KEY_ID,
            "secret_file": str(etc / "exit.secret"),
            "heartbeat": 1.0,
            "connect_timeout": 5.0,
            "log_level": "info",
        }
        values.update(overrides)
        return write_config(etc / name, "worker", values)

    # ------------------------------------------------------------------------------- jobs

    def standin_command(self, idle: float, term_status: int = 0,
                        output_bytes: int = 1 << 20) -> str:  # fmt: skip
        """GLIDEIN_COMMAND for the site copy (bash array text)."""
        argv = [site_python(self.user), str(self.home / "glidein_standin.py"), "run",
                "--report-dir", str(self.home / "reports"),
                "--collector", f"{self.sink}:{COLLECTOR_PORT}",
                "--shadow", f"{self.sink}:{SHADOW_PORT}",
                "--stage-out", f"{self.sink}:{STAGE_OUT_PORT}",
                "--idle", f"{idle:g}", "--term-status", str(term_status),
                "--output-bytes", str(output_bytes)]  # fmt: skip
        return "(" + " ".join(f'"{a}"' for a in argv) + ")"

    def write_sbatch(self, name: str, idle: float, term_status: int = 0,
                     ready_timeout: float = 20, **values: str) -> Path:  # fmt: skip
        """A site copy of glidein.sbatch in RELAY_HOME (values: more site values, bash text)."""
        site_values = {
            "RELAY_HOME": f'"{self.home}"',
            "PROXYCHAINS_LIB": f'"{PROXYCHAINS_LIB}"',
            "GLIDEIN_COMMAND": self.standin_command(idle, term_status),
            "PROBES": f'("{self.sink}:{COLLECTOR_PORT}")',
            # The nodes share this machine's /tmp: each site gets a scratch of its own, as
            # node-local disks would be.
            "WORK_BASE": f'"{self.home / "scratch"}"',
            "READY_TIMEOUT": f"{ready_timeout:g}",
            "USE_CVMFSEXEC": "no",
            "USE_CONTAINER": "no",
        }
        site_values.update(values)
        path = self.home / name
        path.write_text(sbatch_site_copy(site_values))
        path.chmod(0o755)
        _chown(path, self.user)
        return path

    def submit(self, script: Path, uuid: str, minutes: int = 10, *extra: str) -> int:
        """sbatch as TARDIS's Slurm adapter does (deploy/tardis/README.md), as the user."""
        assert self.slurm is not None
        export = (
            f"--export=SLURM_Walltime={minutes},TardisDroneCores=1,TardisDroneMemory=500,"
            f"TardisDroneDisk=1048576,TardisDroneUuid={uuid}"
        )
        return self.slurm.sbatch(
            script, "-p", "batch", "-N", "1", "-n", "1", "-t", str(minutes), "--mem=500mb",
            f"--output={self.home / 'logs' / 'glidein-%j.log'}", export, *extra,
            cwd=self.home,
        )  # fmt: skip

    def job_log(self, job_id: int) -> str:
        path = self.home / "logs" / f"glidein-{job_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self, job_id: int) -> Optional[dict[str, Any]]:
        path = self.home / "reports" / f"{job_id}.json"
        if not path.exists():
            return None
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def tardis(self, script: Path, drones: int, **options: Any) -> TardisDaemon:
        """COBalD/TARDIS (deploy/tardis's structure; FakeBatchSystem in HTCondor's place) with
        the Slurm site adapter over the shell: the daemon runs on the login node as the user
        and submits `script` for each drone. Start it with `with ...:` or .start()."""
        assert self.slurm is not None
        python = tardis_python(self.user)
        entry = pwd.getpwnam(self.user)
        # The daemon imports its demand controller from tests/support/tardis.py: a copy the user
        # can read, whatever the permissions above the checkout.
        path = self.top / "tardis-path"
        for part in ("tests/__init__.py", "tests/support/__init__.py", "tests/support/proc.py",
                     "tests/support/tardis.py"):  # fmt: skip
            (path / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / part, path / part)
        subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
        lab = write_configs(
            self.top / "tardis", startup_command=script, partition="batch", walltime=10,
            cores=1, memory=0.25, disk=1, drones=drones,
            submit_options={"output": str(self.home / "logs" / "glidein-%j.log")},
            owner=(entry.pw_uid, entry.pw_gid), **options,
        )  # fmt: skip
        login = self.site.logins[0]

        def spawn(argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> Any:
            variables = [f"{k}={v}" for k, v in env.items()]
            prefix = [*as_user(self.user), "env", "-i", *variables]  # fmt: skip
            return self.site.spawn(login, [*prefix, *argv], cwd=cwd)

        env = {"SLURM_CONF": str(self.slurm.conf), "PYTHONPATH": str(path)}
        reader = [*as_user(self.user), python]  # fmt: skip
        return TardisDaemon(lab, spawn, python=python, env=env, reader=reader)

    def close(self) -> None:
        try:
            if self.slurm is not None:
                self.slurm.stop()
            if self.sshd is not None:
                self.sshd.stop()
        finally:
            if self.site is not None:
                self.site.close()
            shutil.rmtree(self.top, ignore_errors=True)

    def __enter__(self) -> BatchSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout (what a site would download), built once into out."""
    out.mkdir(parents=True, exist_ok=True)
    found = sorted(out.glob("hpc_relay-*.whl"))
    if not found:
        # Built from a copy: setuptools builds in the source tree, and a build/ left there by
        # an interrupted build breaks the next one.
        source = out / "source"
        skip = shutil.ignore_patterns(
            ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".test-results", ".*cache",
            ".hypothesis", "bench",
        )  # fmt: skip
        shutil.copytree(REPO, source, ignore=skip)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        shutil.rmtree(source)
        found = sorted(out.glob("hpc_relay-*.whl"))
    wheel = found[-1]
    out.chmod(0o755)
    wheel.chmod(0o644)
    return wheel

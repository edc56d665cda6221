"""A real Slurm (slurmctld, slurmd, munged from Debian) on a Site's namespaces.

slurmctld runs on the first login node, one slurmd on each compute node; each daemon gets a UTS
namespace of its own (`unshare --uts`) so that its host name is its Slurm node name (login0,
c0, c1, ...), as on a real cluster. One munged with a fresh key serves them all: its socket is a
path in the filesystem, which network namespaces do not separate. Jobs are submitted from the
login node as an unprivileged user (`nobody` by default) and run as that user on the compute
nodes, which reach only the login nodes. No cgroups are needed: processes are tracked through
their parent (proctrack/linuxproc), which still signals every process of a job on scancel or at
its time limit, as Slurm does everywhere.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.site import Site

__all__ = ["UNPRIVILEGED", "SlurmCluster", "SlurmError", "as_user"]

UNPRIVILEGED = "nobody"
PARTITION = "batch"
NODE_CPUS = 2
NODE_MEMORY_MB = 1000


class SlurmError(RuntimeError):
    pass


def as_user(user: str) -> list[str]:
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]


class SlurmCluster:
    """slurmctld on site.logins[0], slurmd on every site.workers[i] as node c<i>."""

    def __init__(self, site: Site, workdir: Path, kill_wait: int = 30) -> None:
        self.site = site
        self.workdir = workdir.resolve()
        self.kill_wait = kill_wait
        self.login = site.logins[0]
        self.login_ip = site.login_ips[0]
        self.nodes = [f"c{i}" for i in range(len(site.workers))]
        self.conf = self.workdir / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.socket"
        self.logs = self.workdir / "log"

    # ------------------------------------------------------------------------------ start

    def start(self, timeout: float = 30) -> SlurmCluster:
        for sub in ("munge", "munge-key", "state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # Clients (sbatch as nobody) must reach the socket, the key stays root's.
        self.workdir.chmod(0o755)
        (self.workdir / "munge").chmod(0o755)
        (self.workdir / "munge-key").chmod(0o700)
        key = self.workdir / "munge-key" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for node in self.nodes:
            (self.workdir / "spool" / node).mkdir(exist_ok=True)
        self.conf.write_text(self._conf_text())
        self.conf.chmod(0o644)
        # Autodetection misreads this machine's mixed v1/v2 hierarchy; v1 is mounted.
        (self.workdir / "cgroup.conf").write_text(f"CgroupPlugin={_cgroup_plugin()}\n")
        (self.workdir / "cgroup.conf").chmod(0o644)
        munge = self.workdir / "munge"
        self.site.spawn(
            self.login,
            ["munged", "--foreground", "--force", f"--key-file={key}",
             f"--socket={self.munge_socket}", f"--pid-file={munge / 'munged.pid'}",
             f"--log-file={self.logs / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self.site.spawn(self.login, self._daemon("login0", "slurmctld"))
        self._wait(self._controller_up, timeout, "slurmctld does not answer")
        for ns, node in zip(self.site.workers, self.nodes):
            self.site.spawn(ns, self._daemon(node, "slurmd"))
        self._wait(self._all_idle, timeout, "not every slurmd registered")
        return self

    def _daemon(self, hostname: str, daemon: str) -> list[str]:
        # The daemons find slurm.conf through SLURM_CONF, as the clients do.
        return [
            "env", f"SLURM_CONF={self.conf}", "unshare", "--uts", "sh", "-c",
            f"hostname {hostname} && exec {daemon} -D",
        ]  # fmt: skip

    def _conf_text(self) -> str:
        w = self.workdir
        lines = [
            "ClusterName=relaylab",
            f"SlurmctldHost=login0({self.login_ip})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool' / '%n'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'spool' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "ReturnToService=2",
            f"KillWait={self.kill_wait}",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node, ip in zip(self.nodes, self.site.worker_ips):
            lines.append(
                f"NodeName={node} NodeAddr={ip} CPUs={NODE_CPUS} "
                f"RealMemory={NODE_MEMORY_MB} State=UNKNOWN"
            )
        lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=60 State=UP")
        return "".join(f"{line}\n" for line in lines)

    @staticmethod
    def _wait(ok: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.2)
        raise SlurmError(f"{what} within {timeout:g} s")

    def _controller_up(self) -> bool:
        return self.command(["scontrol", "ping"], check=False).returncode == 0

    def _all_idle(self) -> bool:
        out = self.command(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.nodes)

    # -------------------------------------------------------------------------- commands

    def command(
        self,
        argv: Sequence[str],
        user: str | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command on the login node (as `user`; default root)."""
        path = os.environ.get("PATH", "/usr/bin:/bin")
        environment = {"PATH": path, "SLURM_CONF": str(self.conf)}
        environment.update(env or {})
        prefix = as_user(user) if user else []
        full = ["ip", "netns", "exec", self.login, *prefix, "env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *argv]  # fmt: skip
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            why = result.stderr.strip()
            raise SlurmError(f"{' '.join(argv)} exited {result.returncode}: {why}")
        return result

    def sbatch(
        self, script: Path, *options: str, user: str = UNPRIVILEGED, cwd: Path | None = None
    ) -> int:
        """Submit as `user`; returns the job id."""
        argv = ["sbatch", "--parsable", *options]
        if cwd is not None:
            argv.append(f"--chdir={cwd}")
        out = self.command([*argv, str(script)], user=user).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, Reason, ...)."""
        return _fields(self.command(["scontrol", "-o", "show", "job", str(job_id)]).stdout)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones for MinJobAge seconds)."""
        out = self.command(["scontrol", "-o", "show", "job"], check=False).stdout
        return [_fields(line) for line in out.splitlines() if "JobId=" in line]

    def wait_job(self, job_id: int, states: Sequence[str], timeout: float = 120) -> dict[str, str]:
        """Wait until the job's JobState is one of `states`; returns its fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} not {'/'.join(states)} within {timeout:g} s: {info}")

    def scancel(self, job_id: int, *options: str, user: str = UNPRIVILEGED) -> None:
        self.command(["scancel", *options, str(job_id)], user=user)

    def stop(self) -> None:
        """Cancel what is left; the Site ends the daemons and the jobs' processes by pid."""
        self.command(["scancel", "--full", "--user", UNPRIVILEGED], check=False)


def _fields(line: str) -> dict[str, str]:
    """`Key=value ...` of one `scontrol -o` line (the first of a repeated key wins)."""
    fields: dict[str, str] = {}
    for match in re.finditer(r"(\w+)=(\S*)", line):
        fields.setdefault(match.group(1), match.group(2))
    return fields


def _cgroup_plugin() -> str:
    if Path("/sys/fs/cgroup/freezer").is_dir():
        return "cgroup/v1"
    return "cgroup/v2"


def slurm_missing() -> str | None:
    """Why the Slurm lab cannot run here, or None."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} not found (scripts/install-debs installs Slurm and munge)"
    return None

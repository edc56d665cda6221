"""deploy/jureca/glidein.sbatch under a real Slurm, submitted as an unprivileged user.

The site (tests/support/batchsite.py): compute nodes that reach only the login node, OpenSSH and
slurmctld on the login node, the idle-killing firewall, the exit and the pool's stand-ins
outside. The relay is installed with deploy/jureca/install-relay.sh into a project-space
directory as the job's user; the batch script is the shipped one with only its site values
changed. Skipped pieces (no such thing here): cvmfsexec (USE_CVMFSEXEC=no), the Singularity
container (USE_CONTAINER=no) and the real glidein (tests/support/glidein_standin.py instead).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.batchsite import REPO, SBATCH, SITE_BLOCK, BatchSite, tardis_python

DEPLOY_TARDIS = REPO / "deploy" / "tardis"
IDLE = 12.0  # the stand-in's silence: three firewall idle timeouts (4 s)


@pytest.fixture(scope="module")
def batch(root_netns: None) -> Iterator[BatchSite]:
    with BatchSite.create(nodes=3, idle_timeout=4) as site:
        yield site


@pytest.fixture(scope="module")
def time_limited_job(batch: BatchSite) -> int:
    """A glidein job with a one-minute limit, submitted first so its minute passes while the
    other tests run (Slurm enforces limits on a 30 s cycle: it ends 60-90 s after start)."""
    script = batch.write_sbatch("glidein-limited.sbatch", idle=600, term_status=4)
    return batch.submit(script, "lab-timelimit1", 1)


def _wait_report(batch: BatchSite, job: int, key: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = batch.report(job)
        if report and key in report:
            return report
        time.sleep(0.2)
    raise AssertionError(f"no {key!r} in job {job}'s report; log:\n{batch.job_log(job)}")


def _staged_ok(batch: BatchSite, report: dict) -> None:
    assert "stage_out" in report, report
    stage = report["stage_out"]
    assert stage["ok"], report
    stored = batch.staged / stage["name"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == stage["sha256"]
    assert stored.stat().st_size == stage["bytes"] > 0


def _signalled_glidein_ok(
    batch: BatchSite, job: int, state: str, status: int, timeout: float
) -> dict[str, str]:
    """Slurm's SIGTERM (scancel, time limit) reached the glidein through the wrapper; its last
    update and stage-out still got out, and the wrapper exited with its status."""
    ended = ["TIMEOUT", "COMPLETED", "FAILED", "CANCELLED"]
    info = batch.slurm.wait_job(job, ended, timeout)
    report = _wait_report(batch, job, "status")
    log = batch.job_log(job)
    assert info["JobState"] == state, (info, log)
    assert report["signal"] == "SIGTERM" and report["idled"] is False, report
    assert report.get("last") == {"collector": True, "shadow": True}, (report.get("error"), log)
    _staged_ok(batch, report)
    assert "got SIGTERM" in log and f"glidein ended with status {status}" in log, log
    return info


def test_site_copy_changes_only_site_values(batch: BatchSite, time_limited_job: int) -> None:
    shipped = SBATCH.read_text()
    text = batch.write_sbatch("glidein-copy.sbatch", idle=IDLE).read_text()
    assert SITE_BLOCK.sub("", text) == SITE_BLOCK.sub("", shipped)
    assert text != shipped


def test_glidein_job_runs_behind_the_relay_and_stages_out(batch: BatchSite) -> None:
    script = batch.write_sbatch("glidein.sbatch", idle=IDLE)
    uuid = "lab-0123456789"
    job = batch.submit(script, uuid)
    info = batch.slurm.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], 120)
    log = batch.job_log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    report = batch.report(job)
    assert report is not None, log
    # ran as the submitting user on a compute node, with TARDIS's drone uuid for HTCondor
    assert report["uid"] != 0 and report["hostname"].startswith("c"), report
    env = report["env"]
    assert env["TardisDroneUuid"] == uuid
    assert env["_CONDOR_TardisDroneUuid"] == f'"{uuid}"'
    assert env["_CONDOR_STARTD_EXPRS"] == "TardisDroneUuid"
    assert env["LD_PRELOAD"].endswith("libproxychains.so.4")
    assert f'TardisDroneUuid = "{uuid}"' in report["condor_config"]
    # both long-lived connections answered before and after a silence the firewall kills
    assert report["idled"] is True
    assert report["first"] == {"collector": True, "shadow": True}, report
    assert report.get("last") == {"collector": True, "shadow": True}, report
    _staged_ok(batch, report)
    assert "chain ready" in log and "glidein ended with status 0" in log, log
    # the job's scratch directory was cleaned up
    assert report["cwd"] == str(batch.home / "scratch" / f"glidein-{job}"), report["cwd"]
    assert not (batch.home / "scratch" / f"glidein-{job}").exists()


def test_scancel_reaches_the_glidein_through_the_wrapper(batch: BatchSite) -> None:
    script = batch.write_sbatch("glidein-long.sbatch", idle=600, term_status=3)
    job = batch.submit(script, "lab-cancelled01")
    _wait_report(batch, job, "first")
    batch.slurm.scancel(job)
    info = _signalled_glidein_ok(batch, job, "CANCELLED", 3, 60)
    # the batch script ended with the wrapper's status, which is the glidein's
    assert info["ExitCode"] == "3:0", info


@pytest.mark.parametrize(
    ("case", "values", "hop"),
    [
        ("not-installed", {"RELAY_HOME": '"/nonexistent/hpc-relay"'}, "relay"),
        ("wrong-key", {"RELAY_CONFIG": '"${RELAY_HOME}/etc/worker-wrong-key.toml"'}, "exit"),
        ("dead-exit", {"RELAY_CONFIG": '"${RELAY_HOME}/etc/worker-dead-exit.toml"'}, "exit"),
    ],
)
def test_bad_setup_fails_the_job_with_75_naming_the_hop(
    batch: BatchSite, case: str, values: dict[str, str], hop: str
) -> None:
    script = batch.write_sbatch(f"glidein-{case}.sbatch", idle=IDLE, ready_timeout=8, **values)
    started = time.monotonic()
    job = batch.submit(script, f"lab-{case}")
    info = batch.slurm.wait_job(job, ["FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"], 90)
    took = time.monotonic() - started
    log = batch.job_log(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log)
    failing = [line for line in log.splitlines() if "failing hop:" in line]
    assert len(failing) == 1 and f"failing hop: {hop} (" in failing[0], log
    assert batch.report(job) is None  # the glidein never started
    print(f"{case}: failed after {took:.1f} s: {failing[0]}")


def test_tardis_starts_drones_that_run_glideins_and_drains_them(batch: BatchSite) -> None:
    """COBalD/TARDIS submits the glidein jobs itself (sbatch with its --export list), sees
    them run, and when the demand goes away drains them (scancel), as at JSC."""
    script = batch.write_sbatch("glidein-tardis.sbatch", idle=600)
    with batch.tardis(script, drones=2) as tardis:
        drones = tardis.wait_states(2, "AvailableState", 150)
        for drone in drones:
            assert drone.uuid.startswith("lab-") and drone.job_id is not None, drone
            job = int(drone.job_id)
            assert batch.slurm.job(job)["JobState"] == "RUNNING"
            report = _wait_report(batch, job, "first")
            # the drone's uuid reached the glidein's HTCondor settings; its chain is up
            assert report["env"]["TardisDroneUuid"] == drone.uuid, report
            assert report["env"]["_CONDOR_TardisDroneUuid"] == f'"{drone.uuid}"'
            assert report["first"] == {"collector": True, "shadow": True}, report
        tardis.set_drones(0)
        tardis.wait_gone([d.uuid for d in drones], 150)
        history = tardis.history()
    for drone in drones:
        job = int(drone.job_id or 0)
        info = batch.slurm.wait_job(job, ["CANCELLED", "COMPLETED", "FAILED"], 60)
        report = _wait_report(batch, job, "status")
        # drained: scancel's SIGTERM reached the glidein, which staged out through the relay
        assert info["JobState"] == "CANCELLED", (info, batch.job_log(job))
        assert report["signal"] == "SIGTERM", report
        _staged_ok(batch, report)
        # its life in TARDIS's log; at DownState TARDIS removed it from the registry (above)
        states = history[drone.uuid]
        for state in ("BootingState", "AvailableState", "DrainState", "ShutDownState"):
            assert state in states, (drone.uuid, states)
        assert states.index("AvailableState") < states.index("DrainState"), states
        assert states.index("DrainState") < states.index("ShutDownState"), states


def test_tardis_sees_a_failing_glidein_and_does_not_resubmit_at_once(batch: BatchSite) -> None:
    """A drone whose job fails (the exit refuses the relay's key: exit 75) goes to TARDIS's
    cleanup; TARDIS submits no new job while Slurm still lists the failed one (MinJobAge, 300 s
    here), so a broken site costs one job per MinJobAge, not one per pool tick."""
    script = batch.write_sbatch(
        "glidein-tardis-wrong-key.sbatch", idle=IDLE, ready_timeout=8,
        RELAY_CONFIG='"${RELAY_HOME}/etc/worker-wrong-key.toml"',
    )  # fmt: skip
    with batch.tardis(script, drones=1) as tardis:
        history = tardis.wait_history(
            lambda h: any("CleanupState" in states for states in h.values()), 120, "a cleanup"
        )
        uuid = next(u for u, states in history.items() if "CleanupState" in states)
        # 20 s are 10 pool ticks and 20 drone heartbeats of this TARDIS
        time.sleep(20)
        drones = tardis.drones()
        history = tardis.history()
    mine = [j for j in batch.slurm.jobs() if j.get("Command") == str(script)]
    assert len(mine) == 1, mine
    assert mine[0]["JobState"] == "FAILED" and mine[0]["ExitCode"] == "75:0", mine[0]
    log = batch.job_log(int(mine[0]["JobId"]))
    assert "failing hop: exit (" in log and "bad-auth" in log, log
    assert history[uuid][-1] == "CleanupState", history
    assert [d.state for d in drones if d.uuid == uuid] == ["CleanupState"], drones


def test_shipped_tardis_configuration_loads_in_cobald_tardis(tmp_path: Path) -> None:
    """deploy/tardis/cobald.yml and tardis.yml as shipped (the registry's path aside) build
    COBalD's pipeline with TARDIS's pool for the Slurm site."""
    for name in ("cobald.yml", "tardis.yml"):
        text = (DEPLOY_TARDIS / name).read_text()
        text = text.replace("/var/lib/cobald/drone_registry.db", str(tmp_path / "registry.db"))
        (tmp_path / name).write_text(text)
    code = (
        "from cobald.daemon.core.config import load\n"
        "with load('cobald.yml') as sections:\n"
        "    for pipeline in sections.values():\n"
        "        print(' '.join(type(stage).__name__ for stage in pipeline))\n"
    )
    result = subprocess.run(
        [tardis_python(), "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stages = result.stdout.split()
    assert stages[0] == "LinearController" and "Logger" in stages, stages
    assert stages[-1] == "WeightedComposite", stages  # TARDIS's pools, one per machine type


def test_time_limit_reaches_the_glidein_through_the_wrapper(
    batch: BatchSite, time_limited_job: int
) -> None:
    _signalled_glidein_ok(batch, time_limited_job, "TIMEOUT", 4, 150)

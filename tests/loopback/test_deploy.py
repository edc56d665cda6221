"""deploy/: the systemd unit verifies and behaves as the unit promises (notify, reload,
stop), the example configurations load, the shell scripts pass bash -n and shellcheck, the
batch script starts the glidein the way its comments say, make-keys.sh's output really
opens the chain, and the TARDIS configuration has the shape TARDIS reads."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.config.loading import load_exit_config, load_worker_config
from relay.config.schema import EXIT_OPTIONS, WORKER_OPTIONS, Option
from relay.config.values import HostPort, LoginTarget
from relay.exit.daemon import RelayExit
from relay.tools.check import OK, check_chain
from relay.worker.settings import WorkerSettings
from tests.support.helpers import Servers, echo_handler, exit_settings
from tests.support.sshd import Sshd
from tests.support.yamlfile import load_yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "relay-exit.service"
BIN = Path(sys.executable).parent
UNIT_EXEC = "/opt/hpc-relay/venv/bin/relay-exit"
SCRIPTS = sorted(
    p
    for p in DEPLOY.rglob("*")
    if p.is_file() and p.read_bytes()[:40].startswith((b"#!/bin/bash", b"#!/usr/bin/env bash"))
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} missing: run scripts/install-debs", pytrace=False)
    return path


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- shell scripts ----------------------------------------------------------------------------


def test_the_scripts_are_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"glidein.sbatch", "make-keys.sh", "install-relay.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_script_passes_bash_n_and_shellcheck(script: Path) -> None:
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "--severity=info", str(script)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


SBATCH = DEPLOY / "jureca" / "glidein.sbatch"
SITE_BEGIN = "# ============================ site-specific values"
SITE_END = "# ======================================================================="


def test_batch_script_keeps_every_site_value_at_the_top() -> None:
    text = SBATCH.read_text()
    head, _, rest = text.partition(SITE_BEGIN)
    block, _, body = rest.partition(SITE_END)
    assert block and body, "site block markers missing"
    assigned = re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.MULTILINE)
    in_block = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", block, re.MULTILINE))
    assert set(assigned) == in_block, "site values assigned outside the block at the top"
    for literal in ("/p/project", "example.org", "192.0.2."):
        assert literal not in head + body, f"{literal!r} outside the site block"


def _stub(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)


def _batch_copy(tmp_path: Path) -> tuple[Path, Path]:
    """glidein.sbatch with its site values pointed at stubs that record what they get."""
    home, calls = tmp_path / "home", tmp_path / "calls"
    calls.mkdir()
    _stub(
        home / "venv" / "bin" / "glidein-wrapper",
        f'printf "%s\\n" "$@" > {calls}/wrapper\n'
        'while [ "$1" != "--" ]; do shift; done; shift\nexec "$@"\n',
    )
    _stub(
        home / "cvmfsexec" / "mountrepo",
        f'mkdir -p "$(dirname "$0")/dist/cvmfs/$1"\necho "mount $1" >> {calls}/cvmfs\n',
    )
    _stub(home / "cvmfsexec" / "umountrepo", f'echo "umount $1" >> {calls}/cvmfs\n')
    _stub(
        tmp_path / "bin" / "singularity",
        f'printf "%s\\n" "$@" > {calls}/singularity\necho "$PWD" > {calls}/pwd\nexit 7\n',
    )
    (home / "images").mkdir()
    (home / "images" / "cms-glidein-cc7.sif").write_text("image")
    (home / "etc").mkdir()
    (home / "etc" / "worker.toml").write_text("[worker]\n")
    text = SBATCH.read_text()
    for name, value in (
        ("RELAY_HOME", str(home)),
        ("SINGULARITY", str(tmp_path / "bin" / "singularity")),
        ("WORK_BASE", str(tmp_path / "scratch")),
    ):
        text, count = re.subn(rf"^{name}=.*$", f'{name}="{value}"', text, flags=re.MULTILINE)
        assert count == 1, name
    (tmp_path / "scratch").mkdir()
    script = tmp_path / "glidein.sbatch"
    script.write_text(text)
    return script, calls


def _run_batch(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "4242"}
    return subprocess.run(
        ["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_batch_script_mounts_cvmfs_and_runs_the_glidein_behind_the_wrapper(
    tmp_path: Path,
) -> None:
    script, calls = _batch_copy(tmp_path)
    result = _run_batch(script, TardisDroneUuid="jureca-0123456789")
    assert result.returncode == 7, result.stderr  # the glidein's status comes back
    home = tmp_path / "home"
    assert (calls / "cvmfs").read_text().splitlines() == [
        "mount cms.cern.ch",
        "mount oasis.opensciencegrid.org",
        "umount cms.cern.ch",
        "umount oasis.opensciencegrid.org",
    ]
    wrapper = (calls / "wrapper").read_text().splitlines()
    split = wrapper.index("--")
    options, command = wrapper[:split], wrapper[split + 1 :]
    pairs = list(zip(options, options[1:]))
    assert ("--config", f"{home}/etc/worker.toml") in pairs
    assert ("--drone-uuid", "jureca-0123456789") in pairs
    assert ("--probe", "collector.example.org:9618") in pairs
    assert ("--direct", "192.0.2.0/24") in pairs
    assert "--container-env" in options
    work = tmp_path / "scratch" / "glidein-4242"
    assert ("--run-dir", str(work)) in pairs
    assert command[:2] == [str(tmp_path / "bin" / "singularity"), "exec"]
    singularity = (calls / "singularity").read_text().splitlines()
    assert f"{home}/cvmfsexec/dist/cvmfs:/cvmfs" in singularity
    assert singularity[-2:] == [
        f"{home}/images/cms-glidein-cc7.sif",
        f"{home}/glidein/start-glidein.sh",
    ]
    assert (calls / "pwd").read_text().strip() == str(work)
    assert not work.exists(), "the job's scratch directory is left behind"


def test_batch_script_without_tardis_has_no_drone_uuid(tmp_path: Path) -> None:
    script, calls = _batch_copy(tmp_path)
    assert _run_batch(script).returncode == 7
    assert "--drone-uuid" not in (calls / "wrapper").read_text().splitlines()


def test_batch_script_stops_early_when_something_is_missing(tmp_path: Path) -> None:
    script, calls = _batch_copy(tmp_path)
    (tmp_path / "home" / "images" / "cms-glidein-cc7.sif").unlink()
    result = _run_batch(script)
    assert result.returncode == 2
    assert "cms-glidein-cc7.sif" in result.stderr and "README" in result.stderr
    assert not (calls / "cvmfs").exists()


def test_batch_script_without_the_relay_fails_75_naming_the_hop(tmp_path: Path) -> None:
    script, calls = _batch_copy(tmp_path)
    (tmp_path / "home" / "etc" / "worker.toml").unlink()
    result = _run_batch(script)
    assert result.returncode == 75, result.stderr
    lines = [line for line in result.stderr.splitlines() if "failing hop:" in line]
    assert len(lines) == 1 and "failing hop: relay (not installed: missing" in lines[0]
    assert not (calls / "wrapper").exists() and not (calls / "cvmfs").exists()


def test_make_keys_refuses_bad_arguments(tmp_path: Path) -> None:
    script = DEPLOY / "jureca" / "make-keys.sh"
    for args in ([], ["bad id", "exit:80", "10.0.0.0/8"], ["k", "no-port", "10.0.0.0/8"]):
        result = subprocess.run([str(script), *args], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2, args


async def test_make_keys_output_opens_the_chain(sshd: Sshd, tmp_path: Path) -> None:
    """The README's key procedure, literally: the printed authorized_keys line goes to the
    login node, the printed exit.keys line to the exit, and relay check passes."""
    servers = Servers()
    echo_port = await servers.start(echo_handler)
    exit_port = free_port()
    keys_dir = tmp_path / "etc"
    made = subprocess.run(
        [
            str(DEPLOY / "jureca" / "make-keys.sh"),
            "site-1",
            f"127.0.0.1:{exit_port}",
            "127.0.0.1",
            str(keys_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = made.stdout.splitlines()
    authorized = next(line for line in lines if line.startswith("from="))
    assert "restrict,port-forwarding" in authorized and 'command="/bin/false"' in authorized
    key_line = next(line for line in lines if line.startswith("site-1 "))
    for name in ("relay_ed25519", "site-1.secret", "socks.auth"):
        assert (keys_dir / name).stat().st_mode & 0o077 == 0, name
    again = subprocess.run(
        [str(DEPLOY / "jureca" / "make-keys.sh"), "site-1", "h:1", "x", str(keys_dir)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "not overwriting" in again.stderr

    (sshd.workdir / "authorized_keys").write_text(authorized + "\n")
    keys = private(tmp_path / "exit.keys", key_line + "\n")
    exit_cfg = load_exit_config(["--keys", str(keys), "--allow", "127.0.0.1/32:*"])
    settings = exit_settings(listen=HostPort("127.0.0.1", exit_port), keys=keys)
    assert settings.secrets == {"site-1": key_line.split()[1].encode()}
    relay_exit = RelayExit(settings)
    await relay_exit.start()
    try:
        assert exit_cfg["keys"] == keys
        worker = WorkerSettings(
            login=(LoginTarget(sshd.user, sshd.host, sshd.port),),
            ssh_key=keys_dir / "relay_ed25519",
            known_hosts=sshd.known_hosts,
            exit=(HostPort("127.0.0.1", exit_port),),
            key_id="site-1",
            secret_file=keys_dir / "site-1.secret",
            connect_timeout=5.0,
        )
        hops = await check_chain(worker, [("127.0.0.1", echo_port)])
        assert [h.status for h in hops] == [OK] * 5, hops
        # a different exit port is not in permitopen: the login node refuses to forward
        worker.exit = (HostPort("127.0.0.1", exit_port + 1),)
        hops = await check_chain(worker, [("127.0.0.1", echo_port)])
        tcp = next(h for h in hops if h.name == "tcp")
        assert "forbids forwarding" in tcp.cause
    finally:
        await relay_exit.stop()
        await servers.close()


# -- example configurations -------------------------------------------------------------------


def test_example_exit_toml_loads(tmp_path: Path) -> None:
    keys = private(tmp_path / "exit.keys", "site-1 0123456789abcdef0123456789abcdef\n")
    cfg = load_exit_config(["--config", str(DEPLOY / "systemd" / "exit.toml"), "--keys", str(keys)])
    assert cfg["listen"].port == 80 and len(cfg["allow"]) == 4
    assert cfg["metrics"] is not None and cfg["log_format"] == "json"
    assert (cfg["max_carriers"], cfg["max_carriers_per_key"]) == (2000, 1000)
    assert (cfg["max_streams"], cfg["max_streams_per_key"]) == (50000, 20000)
    unit = UNIT.read_text()
    assert "--config /etc/hpc-relay/exit.toml" in unit


def test_example_worker_toml_loads(tmp_path: Path) -> None:
    files = {
        "--socks-auth": private(tmp_path / "socks.auth", "glidein:pw\n"),
        "--ssh-key": private(tmp_path / "key", "not read at load time\n"),
        "--known-hosts": private(tmp_path / "known_hosts", ""),
        "--secret-file": private(tmp_path / "secret", "0123456789abcdef0123\n"),
    }
    args = ["--config", str(DEPLOY / "jureca" / "worker.toml")]
    for flag, path in files.items():
        args += [flag, str(path)]
    cfg = load_worker_config(args)
    assert len(cfg["login"]) == 2 and cfg["exit"][0].port == 80 and cfg["key_id"] == "jureca-1"
    assert cfg["socks"].port == 0
    assert cfg["carriers"] == 2


@pytest.mark.parametrize(
    ("path", "options"),
    [
        (DEPLOY / "systemd" / "exit.toml", EXIT_OPTIONS),
        (DEPLOY / "jureca" / "worker.toml", WORKER_OPTIONS),
    ],
    ids=["exit.toml", "worker.toml"],
)
def test_example_configs_name_only_options_that_exist(
    path: Path, options: tuple[Option, ...]
) -> None:
    """Keys shown commented out are there to be uncommented: each must still be an option
    (a renamed one would stop the daemon with 'unknown key')."""
    text = path.read_text()
    known = {o.key for o in options if o.name != "config"}
    commented = set(re.findall(r"^#\s?([a-z_]+) = ", text, re.MULTILINE))
    assert commented, path
    assert commented <= known, sorted(commented - known)


# -- systemd ---------------------------------------------------------------------------------


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv (verify checks the binary exists)."""
    text = UNIT.read_text()
    assert text.count(UNIT_EXEC) == 1
    copy = tmp_path / "relay-exit.service"
    copy.write_text(text.replace(UNIT_EXEC, str(BIN / "relay-exit")))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    out = subprocess.run(
        [tool("systemd-analyze"), "verify", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stdout + out.stderr


def test_unit_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "User=hpc-relay",
        "LimitNOFILE=65536",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
    out = subprocess.run(
        [
            tool("systemd-analyze"),
            "security",
            "--offline=true",
            "--threshold=25",
            str(_unit_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    assert "Overall exposure level" in out.stdout


def test_sysusers_file_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    out = subprocess.run(
        [
            tool("systemd-sysusers"),
            f"--root={tmp_path}",
            "--dry-run",
            str(DEPLOY / "systemd" / "hpc-relay.conf"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "hpc-relay" in out.stdout + out.stderr


def _notifications(sock: socket.socket, until: str, timeout: float = 20) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(message)
        if until in message.split("\n"):
            return got
    raise AssertionError(f"no {until} from relay-exit within {timeout}s (got {got})")


def test_exit_speaks_the_units_notify_reload_and_stop_protocol(tmp_path: Path) -> None:
    """What Type=notify, ExecReload=kill -HUP and KillSignal=SIGTERM rely on."""
    keys = private(tmp_path / "exit.keys", "site-1 0123456789abcdef0123456789abcdef\n")
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        proc = subprocess.Popen(
            [
                str(BIN / "relay-exit"),
                "--config", str(DEPLOY / "systemd" / "exit.toml"),
                "--keys", str(keys),
                "--listen", f"127.0.0.1:{free_port()}",
                "--metrics", f"127.0.0.1:{free_port()}",
            ],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert any("READY=1" in m for m in _notifications(sock, "READY=1"))
            keys.write_text(
                "site-1 0123456789abcdef0123456789abcdef\nsite-2 fedcba9876543210fedcba98\n"
            )
            proc.send_signal(signal.SIGHUP)
            reload = _notifications(sock, "READY=1")
            assert "RELOADING=1" in reload[0]
            proc.send_signal(signal.SIGTERM)
            assert _notifications(sock, "STOPPING=1")
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        log = proc.stderr.read()
    reloaded = [line for line in log.splitlines() if '"reloaded"' in line]
    assert reloaded and '"keys": 2' in reloaded[0], log


# -- COBalD/TARDIS -----------------------------------------------------------------------------


def test_tardis_configuration_has_the_shape_tardis_reads() -> None:
    """The keys TARDIS requires, and that the drones run this repository's batch script
    (tests/lab/test_batch_site.py loads the files with COBalD/TARDIS itself)."""
    cobald = load_yaml(DEPLOY / "tardis" / "cobald.yml")
    stages = [next(iter(stage)) for stage in cobald["pipeline"]]
    assert stages[0] == "!LinearController" and stages[-1] == "!TardisPoolFactory"
    assert cobald["pipeline"][-1]["!TardisPoolFactory"]["configuration"] == "tardis.yml"

    tardis = load_yaml(DEPLOY / "tardis" / "tardis.yml")
    batch = tardis["BatchSystem"]
    assert batch["adapter"] == "HTCondor" and batch["max_age"] > 0 and batch["ratios"]
    for site in tardis["Sites"]:
        assert {"name", "adapter", "quota"} <= set(site)
        assert site["adapter"] == "Slurm"
        section = tardis[site["name"]]
        executor = section["executor"]["!SSHExecutor"]
        assert {"host", "username", "client_keys", "known_hosts"} <= set(executor)
        for machine in section["MachineTypes"]:
            conf = section["MachineTypeConfiguration"][machine]
            assert {"Walltime", "Partition", "StartupCommand"} <= set(conf)
            assert Path(conf["StartupCommand"]).name == SBATCH.name
            assert {"Cores", "Memory", "Disk"} <= set(section["MachineMetaData"][machine])


async def test_check_runs_from_the_shipped_worker_toml_shape(sshd: Sshd, tmp_path: Path) -> None:
    """The example worker.toml with this lab's hosts filled in passes relay check."""
    servers = Servers()
    echo_port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    try:
        text = (DEPLOY / "jureca" / "worker.toml").read_text()
        text = re.sub(
            r"login = \[[^\]]*\]", f'login = ["{sshd.user}@{sshd.host}:{sshd.port}"]', text
        )
        text = re.sub(r'exit = \["[^"]*"\]', f'exit = ["127.0.0.1:{relay_exit.address[1]}"]', text)
        text = text.replace('key_id = "jureca-1"', 'key_id = "worker-1"')
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "worker.toml").write_text(text)
        shutil.copy(sshd.client_key, etc / "relay_ed25519")
        shutil.copy(sshd.known_hosts, etc / "known_hosts")
        private(etc / "jureca-1.secret", "0123456789abcdef0123456789abcdef\n")
        private(etc / "socks.auth", "glidein:pw\n")
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "relay"), "check", "--config", str(etc / "worker.toml"),
            "--probe", f"127.0.0.1:{echo_port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode() + err.decode()
    finally:
        await relay_exit.stop()
        await servers.close()


# -- operator docs ------------------------------------------------------------------------------


def test_operator_docs_point_at_files_that_exist() -> None:
    docs = [REPO / "docs" / "OPERATIONS.md", *sorted(DEPLOY.glob("*/README.md"))]
    for doc in docs:
        text = doc.read_text()
        for path in set(re.findall(r"\b(deploy/[A-Za-z0-9_./-]+[A-Za-z0-9_])", text)):
            assert (REPO / path).exists(), f"{doc.name} names {path}, which does not exist"
    operations = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert "](CONFIG.md)" in operations and "](METRICS.md)" in operations
    assert "](PERFORMANCE.md)" in operations  # where the measured numbers come from

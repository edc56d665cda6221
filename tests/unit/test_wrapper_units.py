"""glidein-wrapper's pieces without a network: options, generated files, environment."""

from __future__ import annotations

import ipaddress
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from glidein_wrapper import condor, proxychains
from glidein_wrapper.main import main
from glidein_wrapper.options import UsageError, parse_args
from glidein_wrapper.rundir import make_run_dir, new_credentials, write_private
from glidein_wrapper.supervisor import exit_status

BIN = Path(sys.executable).parent


def test_options_defaults_and_command() -> None:
    opts = parse_args(["--config", "w.toml", "--", "glidein_startup.sh", "-v", "--", "x"])
    assert opts.command == ["glidein_startup.sh", "-v", "--", "x"]
    assert opts.config == Path("w.toml")
    assert (opts.ready_timeout, opts.drain_timeout, opts.status_interval) == (120, 10, 300)
    assert opts.remote_dns and opts.http and opts.proxy_env and not opts.container_env
    assert opts.attach is None and opts.probes == [] and opts.direct == []


def test_options_lists_and_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TardisDroneUuid", "from-env-1")
    opts = parse_args(
        ["--config", "w.toml", "--probe", "collector.example.org:9618", "--probe", "[::1]:80",
         "--direct", "10.1.2.3/24", "--direct", "192.0.2.7", "--no-remote-dns", "--no-http",
         "--no-proxy-env", "--container-env", "--ready-timeout", "5", "--", "true"]
    )  # fmt: skip
    assert [str(p) for p in opts.probes] == ["collector.example.org:9618", "[::1]:80"]
    assert opts.direct == [
        ipaddress.ip_network("10.1.2.0/24"),
        ipaddress.ip_network("192.0.2.7/32"),
    ]
    assert not opts.remote_dns and not opts.http and not opts.proxy_env and opts.container_env
    assert opts.ready_timeout == 5
    assert opts.drone_uuid == "from-env-1"
    assert parse_args(["--config", "w", "--drone-uuid", "given", "--", "x"]).drone_uuid == "given"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "w.toml"], "missing COMMAND"),
        (["--", "true"], "missing --config"),
        (["--config", "w", "--attach", "127.0.0.1:1080", "--", "x"], "exclude each other"),
        (["--attach", "127.0.0.1:1080", "--", "x"], "--attach-auth"),
        (["--config", "w", "--attach-auth", "f", "--", "x"], "only for --attach"),
        (["--config", "w", "--probe", "nohost", "--", "x"], "--probe"),
        (["--config", "w", "--direct", "10.0.0.0/33", "--", "x"], "--direct"),
        (["--config", "w", "--ready-timeout", "0", "--", "x"], "--ready-timeout"),
        (["--config", "w", "--drone-uuid", 'x" y', "--", "x"], "--drone-uuid"),
        (["--config", "w", "--remote-dns", "--no-remote-dns", "--", "x"], "not allowed"),
        (["--config", "w", "--ready", "5", "--", "x"], "unrecognized"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_usage_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "w.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glidein-wrapper: error: missing COMMAND")


def test_config_error_exits_2_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nheartbeat = "often"\n')
    lib = write_private(tmp_path / "libproxychains4.so", "")
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    code = main(
        ["--config", str(config), "--preload", str(lib), "--run-dir", str(run_dir), "--", "true"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heartbeat in" in err[0] and str(config) in err[0]
    assert list(run_dir.iterdir()) == []  # the private run directory is removed again


def test_missing_preload_library_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere" / "libproxychains4.so"
    assert main(["--config", "w.toml", "--preload", str(missing), "--", "true"]) == 2
    assert f"--preload {missing}: no such file" in capsys.readouterr().err
    monkeypatch.setattr(proxychains, "PRELOAD_CANDIDATES", ("/nonexistent/libproxychains4.so",))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["--config", "w.toml", "--", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "cannot find the proxychains-ng library" in err[0] and "--preload PATH" in err[0]


def test_preload_is_found_where_debian_puts_it() -> None:
    found = proxychains.find_preload()
    assert Path(found).is_file() and "proxychains" in found
    # in a container the library may exist only inside the image: taken as given
    inside = Path("/opt/in-image/libproxychains4.so")
    assert proxychains.find_preload(inside, must_exist=False) == str(inside)


def test_proxychains_config() -> None:
    direct = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]
    text = proxychains.render_config("127.0.0.1", 40000, "glidein", "pw-1", direct, True, 25)
    lines = text.splitlines()
    assert lines[1:3] == ["strict_chain", "quiet_mode"]
    assert "proxy_dns" in lines and "tcp_read_time_out 25000" in lines
    assert lines.index("[ProxyList]") < lines.index("socks5 127.0.0.1 40000 glidein pw-1")
    localnets = [line for line in lines if line.startswith("localnet")]
    assert localnets == [
        "localnet 127.0.0.0/255.0.0.0",
        "localnet 192.0.2.0/255.255.255.0",
        "localnet 2001:db8::/32",
    ]
    assert "proxy_dns" not in proxychains.render_config("127.0.0.1", 1, "u", "p", (), False)
    with pytest.raises(ValueError, match="blanks"):
        proxychains.render_config("127.0.0.1", 1, "u", "pass word")


def test_proxy_environment(tmp_path: Path) -> None:
    env = proxychains.proxy_env(
        preload="/lib/libproxychains4.so",
        config=tmp_path / "pc.conf",
        socks=("127.0.0.1", 40000),
        user="glidein",
        password="p@ss:w/rd",
        http=("127.0.0.1", 40001),
        direct=[ipaddress.ip_network("192.0.2.0/24")],
        inherited={"LD_PRELOAD": "/lib/other.so"},
    )
    assert env["LD_PRELOAD"] == "/lib/libproxychains4.so:/lib/other.so"
    assert env["PROXYCHAINS_CONF_FILE"] == str(tmp_path / "pc.conf")
    assert env["PROXYCHAINS_QUIET_MODE"] == "1"
    socks = "socks5h://glidein:p%40ss%3Aw%2Frd@127.0.0.1:40000"
    assert env["ALL_PROXY"] == env["all_proxy"] == socks
    assert (
        env["https_proxy"] == env["HTTPS_PROXY"] == "http://glidein:p%40ss%3Aw%2Frd@127.0.0.1:40001"
    )
    assert "http_proxy" not in env and "HTTP_PROXY" not in env
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,127.0.0.0/8,::1,192.0.2.0/24"
    bare = proxychains.proxy_env(
        preload="/l.so", config=tmp_path / "c", socks=("127.0.0.1", 1), user="u", password="p",
        http=None, proxy_variables=False, inherited={},
    )  # fmt: skip
    assert set(bare) == {"LD_PRELOAD", "PROXYCHAINS_CONF_FILE", "PROXYCHAINS_QUIET_MODE"}
    copies = proxychains.container_env({"LD_PRELOAD": "/l.so", "_CONDOR_X": "1"})
    assert copies == {
        "SINGULARITYENV_LD_PRELOAD": "/l.so",
        "SINGULARITYENV__CONDOR_X": "1",
        "APPTAINERENV_LD_PRELOAD": "/l.so",
        "APPTAINERENV__CONDOR_X": "1",
    }


def test_condor_settings() -> None:
    assert condor.condor_env(None) == {
        "_CONDOR_UPDATE_COLLECTOR_WITH_TCP": "True",
        "_CONDOR_UPDATE_VIEW_COLLECTOR_WITH_TCP": "True",
        "_CONDOR_WANT_UDP_COMMAND_SOCKET": "False",
    }
    env = condor.condor_env("abc-123")
    assert env["_CONDOR_TardisDroneUuid"] == '"abc-123"'
    assert env["_CONDOR_STARTD_EXPRS"] == "TardisDroneUuid"
    assert "_CONDOR_STARTD_ATTRS" not in env  # that would replace the glidein's own list
    assert env["TardisDroneUuid"] == "abc-123"
    snippet = condor.render_snippet("abc-123").splitlines()
    assert 'TardisDroneUuid = "abc-123"' in snippet
    assert "STARTD_ATTRS = $(STARTD_ATTRS) TardisDroneUuid" in snippet
    assert "UPDATE_COLLECTOR_WITH_TCP = True" in snippet
    assert "TardisDroneUuid" not in condor.render_snippet(None)


def test_run_dir_and_private_files(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    path = write_private(run_dir / "socks.auth", "u:p\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_private(path, "again")
    user, password = new_credentials()
    assert user == "glidein" and len(password) >= 32
    assert all(c.isalnum() or c in "-_" for c in password)
    assert new_credentials()[1] != password


def test_exit_status_mapping() -> None:
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGTERM) == 143
    assert exit_status(-signal.SIGKILL) == 137


def test_console_script_help() -> None:
    res = subprocess.run(
        [str(BIN / "glidein-wrapper"), "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0
    assert "-- COMMAND" in res.stdout and "75" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "glidein_wrapper"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 2 and "missing COMMAND" in res.stderr

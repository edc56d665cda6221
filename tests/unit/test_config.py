"""Configuration front ends (TOML file and flags) and secret-file readers, on real files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config.loading import (
    Values,
    build_parser,
    default_value,
    load_exit_config,
    load_worker_config,
)
from relay.config.schema import CHECK_OPTIONS, EXIT_OPTIONS, KINDS, WORKER_OPTIONS, Option
from relay.config.secrets import check_private, load_keys, load_secret, load_userpass
from relay.config.settings import Settings
from relay.config.values import (
    ForwardTarget,
    HostPort,
    LoginTarget,
    Rule,
    parse_hostport,
    parse_login,
    parse_size,
)
from relay.errors import ConfigError
from relay.exit.settings import ExitSettings
from relay.worker.settings import WorkerSettings
from tests.support.tlscerts import make_cert

SECRET = "Sup3r-S3cret-Value-0123456789"
SECRET2 = "An0ther-S3cret-Value-987654321"
PASSWORD = "pa55:w0rd with spaces"


def write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    """Write a file and set its mode explicitly (umask must not decide the test)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    path.chmod(mode)
    return path


def raises(func: Callable[..., object], *args: object) -> str:
    """Call and return the ConfigError message, checking it is one line."""
    with pytest.raises(ConfigError) as info:
        func(*args)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return write(tmp_path / "exit.keys", f"# comment\n\nk1 {SECRET}\nk2 {SECRET2}  # second\n")


@pytest.fixture
def wfiles(tmp_path: Path) -> dict[str, Path]:
    """The files a relay-worker needs, all private."""
    return {
        "ssh_key": write(tmp_path / "id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\n"),
        "secret": write(tmp_path / "secret", SECRET + "\n"),
        "auth": write(tmp_path / "socks.auth", f"glidein:{PASSWORD}\n"),
        "known": write(tmp_path / "known_hosts", "login1 ssh-ed25519 AAAA\n", 0o644),
    }


def worker_argv(f: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--no-socks-auth",
        "--login",
        "alice@login1.hpc.example",
        "--ssh-key",
        str(f["ssh_key"]),
        "--exit",
        "exit.example.org:80",
        "--key-id",
        "k1",
        "--secret-file",
        str(f["secret"]),
        *extra,
    ]


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("options", [EXIT_OPTIONS, WORKER_OPTIONS, CHECK_OPTIONS])
def test_schema_tables(options: tuple[Option, ...]) -> None:
    assert len({o.name for o in options}) == len(options)
    for o in options:
        assert o.kind in KINDS
        assert o.key == o.name.replace("-", "_")
        assert o.help
        if o.kind == "choice":
            assert o.default in o.choices
        if o.repeatable:
            assert o.default == ()
    if options is not CHECK_OPTIONS:
        assert options[0].name == "config"


# --------------------------------------------------------------------------- settings

DERIVED: dict[type[Settings], set[str]] = {
    ExitSettings: {"secrets", "policy", "tls", "tls_fingerprint"},
    WorkerSettings: {"secret", "socks_credentials", "upstream_credentials", "exit_tls"},
}
"""What each settings class computes from its options; nothing else may be on it."""

TABLES: dict[type[Settings], tuple[Option, ...]] = {
    ExitSettings: EXIT_OPTIONS,
    WorkerSettings: WORKER_OPTIONS,
}


@pytest.mark.parametrize("cls", [ExitSettings, WorkerSettings])
def test_settings_are_the_schema(cls: type[Settings]) -> None:
    """Every option is an attribute with the schema's default; the rest is derived from them,
    and no default is written on the class."""
    options = TABLES[cls]
    assert cls.OPTIONS is options
    keys = [o.key for o in options]
    got = cls()
    for opt in options:
        value = getattr(got, opt.key)
        assert value == default_value(opt), opt.key
        assert type(value) is type(default_value(opt)), opt.key
    assert set(vars(got)) == {*keys, *DERIVED[cls]}
    # The annotations (for mypy) name the options in schema order, then the derived values.
    annotated = list(cls.__annotations__)
    assert annotated[: len(keys)] == keys
    assert set(annotated[len(keys) :]) == DERIVED[cls]
    assert not {*keys, *DERIVED[cls]} & set(vars(cls)), "a default on the class"


def test_schema_defaults_parsed() -> None:
    exit_defaults = ExitSettings()
    assert exit_defaults.listen == HostPort("0.0.0.0", 80)
    assert exit_defaults.replay_buffer == 4 << 20 and exit_defaults.max_buffered == 1 << 30
    assert exit_defaults.heartbeat == 25.0 and isinstance(exit_defaults.heartbeat, float)
    assert (exit_defaults.config, exit_defaults.keys, exit_defaults.metrics) == (None, None, None)
    assert exit_defaults.allow == () and exit_defaults.policy.rules == ()
    assert exit_defaults.secrets == {} and exit_defaults.tls is None
    worker_defaults = WorkerSettings()
    assert worker_defaults.socks == HostPort("127.0.0.1", 1080)
    assert (worker_defaults.exit, worker_defaults.login, worker_defaults.forward) == ((), (), ())
    assert worker_defaults.key_id is None and worker_defaults.secret == b""
    assert worker_defaults.no_optimistic is False and worker_defaults.carriers == 2
    assert worker_defaults.socks_credentials is None and worker_defaults.exit_tls is None


def test_settings_keywords() -> None:
    got = ExitSettings(listen=HostPort("127.0.0.1", 0), max_streams=5)
    assert got.listen == HostPort("127.0.0.1", 0) and got.max_streams == 5
    assert got.max_handshakes == 1000
    with pytest.raises(TypeError, match="unknown exit settings: listen_host, listen_port"):
        ExitSettings(listen_host="127.0.0.1", listen_port=0)
    with pytest.raises(TypeError, match="unknown worker settings: optimistic"):
        WorkerSettings(optimistic=False)
    with pytest.raises(TypeError, match="unknown worker settings: probe"):
        WorkerSettings(probe=())  # a `relay check` flag, not a worker option


def test_settings_from_loaded_values(tmp_path: Path, keys: Path, wfiles: dict[str, Path]) -> None:
    values = load_exit_config(["--keys", str(keys), "--allow", "192.0.2.0/24:80"])
    got = ExitSettings.from_values(values)
    assert {k: getattr(got, k) for k in values} == values
    assert got.secrets == {"k1": SECRET.encode(), "k2": SECRET2.encode()}
    assert [r.text for r in got.policy.rules] == ["192.0.2.0/24:80"]
    assert got.policy.check("192.0.2.1", 80).allowed
    assert got.tls is None and got.tls_fingerprint == ""

    argv = worker_argv(wfiles, "--forward", "127.0.0.1:9618=collector.example.org:9618")
    argv.remove("--no-socks-auth")
    values = load_worker_config([*argv, "--socks-auth", str(wfiles["auth"])])
    worker = WorkerSettings.from_values(values)
    assert {k: getattr(worker, k) for k in values} == values
    assert worker.secret == SECRET.encode()
    assert worker.socks_credentials == ("glidein", PASSWORD)
    assert worker.upstream_credentials is None and worker.exit_tls is None
    assert worker.forward == (
        ForwardTarget(HostPort("127.0.0.1", 9618), HostPort("collector.example.org", 9618)),
    )
    pin = bytes(range(32))
    tls = WorkerSettings(exit_fingerprint=(pin,), exit_server_name="exit.test").exit_tls
    assert tls is not None and tls.pins == (pin,) and tls.server_name == "exit.test"


def test_exit_tls_settings(tmp_path: Path) -> None:
    issued = make_cert(tmp_path, "exit")
    got = ExitSettings(tls_cert=issued.cert, tls_key=issued.key)
    assert got.tls is not None and got.tls_fingerprint.startswith("SHA256:")
    loose = tmp_path / "loose.key"
    loose.write_bytes(issued.key.read_bytes())
    loose.chmod(0o644)
    message = raises(lambda: ExitSettings(tls_cert=issued.cert, tls_key=loose))
    assert message == f"--tls-key: {loose} is readable by others (chmod 600 {loose})"
    with pytest.raises(TypeError):
        ExitSettings(tls_cert=issued.cert)


def test_exit_defaults(keys: Path) -> None:
    cfg = load_exit_config(["--keys", str(keys)])
    assert cfg["config"] is None
    assert cfg["keys"] == keys
    assert cfg["listen"] == HostPort("0.0.0.0", 80)
    assert cfg["allow"] == ()
    assert cfg["allow_plain"] is False
    assert cfg["metrics"] is None
    assert cfg["heartbeat"] == 25.0 and isinstance(cfg["heartbeat"], float)
    assert cfg["heartbeat_misses"] == 3
    assert (cfg["handshake_timeout"], cfg["connect_timeout"]) == (10.0, 10.0)
    assert cfg["max_streams"] == 50000
    assert (cfg["max_streams_per_key"], cfg["max_handshakes"]) == (20000, 1000)
    assert (cfg["max_carriers"], cfg["max_carriers_per_key"]) == (2000, 200)
    assert cfg["max_buffered"] == 1 << 30
    assert cfg["tcp_keepalive"] == 60.0
    assert cfg["replay_buffer"] == 4 * 1024 * 1024
    assert cfg["resume_timeout"] == 600.0
    assert cfg["max_parked"] == 10000
    assert (cfg["log_format"], cfg["log_level"], cfg["no_uvloop"]) == ("text", "info", False)


def test_worker_defaults(wfiles: dict[str, Path]) -> None:
    cfg = load_worker_config(worker_argv(wfiles))
    assert cfg["socks"] == HostPort("127.0.0.1", 1080)
    assert cfg["socks_auth"] is None and cfg["no_socks_auth"] is True
    assert cfg["login"] == (LoginTarget("alice", "login1.hpc.example", 22),)
    assert cfg["ssh_key"] == wfiles["ssh_key"]
    assert cfg["known_hosts"] is None
    assert cfg["exit"] == (HostPort("exit.example.org", 80),)
    assert cfg["key_id"] == "k1"
    assert cfg["secret_file"] == wfiles["secret"]
    assert cfg["upstream"] is None and cfg["upstream_auth"] is None
    assert (cfg["heartbeat"], cfg["heartbeat_misses"], cfg["ssh_keepalive"]) == (25.0, 3, 15.0)
    assert (cfg["connect_timeout"], cfg["tcp_keepalive"]) == (15.0, 60.0)
    assert cfg["replay_buffer"] == 4 << 20
    assert cfg["carriers"] == 2 and isinstance(cfg["carriers"], int)
    assert cfg["resume_timeout"] == 600.0
    assert cfg["metrics"] is None
    assert (cfg["log_format"], cfg["log_level"], cfg["no_uvloop"]) == ("text", "info", False)


# --------------------------------------------------------------------------- TOML and flags


def test_exit_toml_only(tmp_path: Path, keys: Path) -> None:
    conf = write(
        tmp_path / "exit.toml",
        f"""
[exit]
listen = "[::]:8080"
keys = "{keys.name}"          # relative to the config file
allow = ["10.1.0.0/16:22-443", ".cern.ch:9618"]
allow_plain = true
metrics = "127.0.0.1:9100"
heartbeat = 5
heartbeat_misses = 4.0
handshake_timeout = 2.5
connect_timeout = 3
max_streams = 10
max_streams_per_key = 5
max_handshakes = 7
max_carriers = 50
max_carriers_per_key = 4
tcp_keepalive = 30
replay_buffer = "512KiB"
resume_timeout = 60
max_parked = 0
log_format = "json"
log_level = "debug"
no_uvloop = true
""",
        0o644,
    )
    cfg = load_exit_config(["--config", str(conf)])
    assert cfg["config"] == conf
    assert cfg["listen"] == HostPort("::", 8080)
    assert cfg["keys"] == keys
    assert [r.text for r in cfg["allow"]] == ["10.1.0.0/16:22-443", ".cern.ch:9618"]
    assert all(isinstance(r, Rule) for r in cfg["allow"])
    assert cfg["allow_plain"] and cfg["no_uvloop"]
    assert cfg["metrics"] == HostPort("127.0.0.1", 9100)
    assert cfg["heartbeat"] == 5.0 and isinstance(cfg["heartbeat"], float)
    assert cfg["heartbeat_misses"] == 4 and isinstance(cfg["heartbeat_misses"], int)
    assert cfg["handshake_timeout"] == 2.5
    assert cfg["connect_timeout"] == 3.0
    assert (cfg["max_streams"], cfg["max_streams_per_key"], cfg["max_handshakes"]) == (10, 5, 7)
    assert (cfg["max_carriers"], cfg["max_carriers_per_key"]) == (50, 4)
    assert cfg["replay_buffer"] == 512 * 1024
    assert cfg["max_parked"] == 0
    assert (cfg["log_format"], cfg["log_level"]) == ("json", "debug")


def test_flags_override_toml_and_repeatable_replaces(tmp_path: Path, keys: Path) -> None:
    conf = write(
        tmp_path / "exit.toml",
        f'[exit]\nkeys = "{keys}"\nallow = ["10.0.0.0/8"]\nheartbeat = 5\nlog_level = "error"\n',
    )
    cfg = load_exit_config(["--config", str(conf)])
    assert [r.text for r in cfg["allow"]] == ["10.0.0.0/8"]
    assert cfg["heartbeat"] == 5.0
    cfg = load_exit_config(
        [
            "--config",
            str(conf),
            "--heartbeat=7.5",
            "--allow",
            "192.0.2.0/24:80",
            "--allow",
            ".example.org",
            "--log-level",
            "warning",
        ]
    )
    assert [r.text for r in cfg["allow"]] == ["192.0.2.0/24:80", ".example.org"]
    assert cfg["heartbeat"] == 7.5
    assert cfg["log_level"] == "warning"


def test_worker_toml_and_flags(tmp_path: Path, wfiles: dict[str, Path]) -> None:
    conf = write(
        tmp_path / "worker.toml",
        f"""
[worker]
socks = "127.0.0.1:0"
socks_auth = "{wfiles["auth"]}"
login = ["login1", "bob@login2:2222", "[2001:db8::5]:22"]
ssh_key = "{wfiles["ssh_key"]}"
known_hosts = "{wfiles["known"]}"
exit = ["exit1.example.org:80", "[2001:db8::1]:443"]
key_id = "node-7.a_b"
secret_file = "{wfiles["secret"]}"
replay_buffer = 1048576
ssh_keepalive = 10
carriers = 4

[exit]   # another daemon's table may share the file
whatever = 1
""",
    )
    cfg = load_worker_config(["--config", str(conf)])
    assert cfg["socks"] == HostPort("127.0.0.1", 0)
    assert cfg["socks_auth"] == wfiles["auth"] and not cfg["no_socks_auth"]
    assert cfg["login"] == (
        LoginTarget(None, "login1", 22),
        LoginTarget("bob", "login2", 2222),
        LoginTarget(None, "2001:db8::5", 22),
    )
    assert cfg["known_hosts"] == wfiles["known"]
    assert cfg["exit"] == (HostPort("exit1.example.org", 80), HostPort("2001:db8::1", 443))
    assert cfg["key_id"] == "node-7.a_b"
    assert cfg["replay_buffer"] == 1 << 20
    assert cfg["ssh_keepalive"] == 10.0
    assert cfg["carriers"] == 4

    cfg = load_worker_config(
        [
            "--config", str(conf), "--login", "carol@login9", "--exit", "e:1", "--exit", "f:2",
            "--carriers", "1",
        ]
    )  # fmt: skip
    assert cfg["login"] == (LoginTarget("carol", "login9", 22),)
    assert cfg["exit"] == (HostPort("e", 1), HostPort("f", 2))
    assert cfg["carriers"] == 1

    # A flag's choice beats the file's choice of the other half of the pair.
    cfg = load_worker_config(["--config", str(conf), "--no-socks-auth"])
    assert cfg["no_socks_auth"] and cfg["socks_auth"] is None


def test_repeatable_key_given_one_string_is_one_entry(
    tmp_path: Path, keys: Path, wfiles: dict[str, Path]
) -> None:
    """``exit = "exit.example.org:80"`` means what ``--exit exit.example.org:80`` means."""
    conf = write(
        tmp_path / "worker.toml",
        f"""
[worker]
socks = "127.0.0.1:0"
socks_auth = "{wfiles["auth"]}"
login = "jrlogin01"
ssh_key = "{wfiles["ssh_key"]}"
known_hosts = "{wfiles["known"]}"
exit = "exit.example.org:80"
key_id = "jureca-1"
secret_file = "{wfiles["secret"]}"
forward = "127.0.0.1:9618=collector.example.org:9618"
exit_fingerprint = "SHA256:{"A" * 43}"
""",
    )
    cfg = load_worker_config(["--config", str(conf)])
    assert cfg["login"] == (LoginTarget(None, "jrlogin01", 22),)
    assert cfg["exit"] == (HostPort("exit.example.org", 80),)
    assert len(cfg["forward"]) == 1 and len(cfg["exit_fingerprint"]) == 1
    # the same as the flags given once
    flags = load_worker_config(
        ["--config", str(conf), "--login", "jrlogin01", "--exit", "exit.example.org:80"]
    )
    assert (flags["login"], flags["exit"]) == (cfg["login"], cfg["exit"])

    exit_conf = write(
        tmp_path / "exit.toml", f'[exit]\nkeys = "{keys}"\nallow = ".example.org:443"\n'
    )
    assert [r.text for r in load_exit_config(["--config", str(exit_conf)])["allow"]] == [
        ".example.org:443"
    ]
    # still checked as an entry: the error names the key and the file
    bad = write(tmp_path / "bad.toml", f'[exit]\nkeys = "{keys}"\nallow = "10.0.0.0/33"\n')
    assert f"allow in {bad}: bad rule '10.0.0.0/33'" in raises(
        load_exit_config, ["--config", str(bad)]
    )


def test_worker_upstream_without_login(wfiles: dict[str, Path]) -> None:
    cfg = load_worker_config(
        [
            "--no-socks-auth",
            "--upstream",
            "socks5://dante.example.org:1080",
            "--upstream-auth",
            str(wfiles["auth"]),
        ]
    )
    assert cfg["upstream"] == HostPort("dante.example.org", 1080)
    assert cfg["upstream_auth"] == wfiles["auth"]
    assert cfg["login"] == () and cfg["exit"] == ()
    cfg = load_worker_config(
        [
            "--no-socks-auth",
            "--upstream=socks5://[2001:db8::9]:1080/",
            "--login",
            "login1",
            "--ssh-key",
            str(wfiles["ssh_key"]),
        ]
    )
    assert cfg["upstream"] == HostPort("2001:db8::9", 1080)


def test_carrier_options_and_their_former_names(
    tmp_path: Path, keys: Path, wfiles: dict[str, Path]
) -> None:
    """The worker keeps --carriers per exit and the exit caps them; the keep-warm options
    these replaced are unknown now, and the error names the option that took their place."""
    assert "--carriers: must be >= 1 (got 0)" in raises(
        load_worker_config, worker_argv(wfiles, "--carriers", "0")
    )
    assert "--carriers: must be a whole number (got 1.5)" in raises(
        load_worker_config, worker_argv(wfiles, "--carriers", "1.5")
    )
    for flag in ("--max-carriers", "--max-carriers-per-key"):
        assert f"{flag}: must be >= 1 (got 0)" in raises(
            load_exit_config, ["--keys", str(keys), flag, "0"]
        )
    conf = write(tmp_path / "w.toml", "[worker]\nwarm_carriers = 2\n")
    msg = raises(load_worker_config, [*worker_argv(wfiles), "--config", str(conf)])
    assert msg == f"warm_carriers in {conf}: unknown key in [worker]; did you mean carriers?"
    for old, new in (
        ("max_warm_carriers", "max_carriers"),
        ("max_warm_carriers_per_key", "max_carriers_per_key"),
    ):
        conf = write(tmp_path / "x.toml", f'[exit]\nkeys = "{keys}"\n{old} = 10\n')
        msg = raises(load_exit_config, ["--config", str(conf)])
        assert msg == f"{old} in {conf}: unknown key in [exit]; did you mean {new}?"
    msg = raises(load_worker_config, worker_argv(wfiles, "--warm-carriers", "2"))
    assert "unrecognized arguments: --warm-carriers" in msg
    msg = raises(load_exit_config, ["--keys", str(keys), "--max-warm-carriers", "2"])
    assert "unrecognized arguments: --max-warm-carriers" in msg


def test_int_and_float_numbers(tmp_path: Path, keys: Path) -> None:
    def load(body: str, *flags: str) -> Values:
        conf = write(tmp_path / "n.toml", f'[exit]\nkeys = "{keys}"\n{body}\n')
        return load_exit_config(["--config", str(conf), *flags])

    assert load("heartbeat = 1")["heartbeat"] == 1.0
    assert load("heartbeat = 0.25")["heartbeat"] == 0.25
    assert load("max_streams = 2.0")["max_streams"] == 2
    assert load("", "--max-streams", "3.0")["max_streams"] == 3
    assert load("", "--heartbeat", "2")["heartbeat"] == 2.0
    assert "max_streams in" in raises(load, "max_streams = 2.5")
    assert "--max-streams: must be a whole number" in raises(load, "", "--max-streams", "2.5")
    assert "--heartbeat: must be a finite number" in raises(load, "", "--heartbeat", "nan")
    assert "heartbeat in" in raises(load, "heartbeat = inf")
    assert raises(load, "", "--heartbeat", "-1") == "--heartbeat: must be > 0 (got -1)"
    assert raises(load, "", "--heartbeat", "0") == "--heartbeat: must be > 0 (got 0)"
    assert raises(load, "", "--heartbeat-misses", "0") == "--heartbeat-misses: must be >= 1 (got 0)"
    assert "expected a number, got string" in raises(load, 'heartbeat = "5"')
    assert "expected a number, got boolean" in raises(load, "heartbeat = true")
    assert raises(load, "", "--heartbeat", "soon") == "--heartbeat: expected a number (got 'soon')"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("4MiB", 4 << 20),
        ("512KiB", 512 << 10),
        ("1GiB", 1 << 30),
        ("2 mib", 2 << 20),
        ("10B", 10),
        (8.0, 8),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["4MB", "1.5MiB", "MiB", "-1", "", "4 MiB extra", 1.5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_size_errors(tmp_path: Path, keys: Path) -> None:
    base = ["--keys", str(keys)]
    msg = raises(load_exit_config, [*base, "--replay-buffer", "4MB"])
    assert msg.startswith("--replay-buffer: ") and "'4MB'" in msg
    assert "--replay-buffer: must be >= 1" in raises(
        load_exit_config, [*base, "--replay-buffer", "0"]
    )
    conf = write(tmp_path / "s.toml", f'[exit]\nkeys = "{keys}"\nreplay_buffer = [1]\n')
    assert f"replay_buffer in {conf}: expected an integer or a string" in raises(
        load_exit_config, ["--config", str(conf)]
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:80", HostPort("0.0.0.0", 80)),
        ("[::1]:1080", HostPort("::1", 1080)),
        ("exit.example.org:65535", HostPort("exit.example.org", 65535)),
        ("exit.example.org.:1", HostPort("exit.example.org.", 1)),
        ("localhost:8080", HostPort("localhost", 8080)),
        ("under_score-host:9", HostPort("under_score-host", 9)),
    ],
)
def test_parse_hostport(text: str, expected: HostPort) -> None:
    assert parse_hostport(text) == expected
    assert parse_hostport(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "host",
        "host:",
        ":80",
        "host:0",
        "host:65536",
        "host:+80",
        "host: 80",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[host]:80",
        "[::1:80",
        "256.1.1.1:80",
        "bad host:80",
        "-bad.example:80",
        "a..b:80",
        "",
    ],
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_port_zero_only_where_allowed(keys: Path, wfiles: dict[str, Path]) -> None:
    assert load_worker_config(worker_argv(wfiles, "--socks", "127.0.0.1:0"))["socks"].port == 0
    msg = raises(load_exit_config, ["--keys", str(keys), "--listen", "0.0.0.0:0"])
    assert msg == "--listen: bad address '0.0.0.0:0': port must be 1..65535"
    msg = raises(load_worker_config, worker_argv(wfiles, "--exit", "e:0"))
    assert msg.startswith("--exit: bad address 'e:0'")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login1", LoginTarget(None, "login1", 22)),
        ("alice@login1", LoginTarget("alice", "login1", 22)),
        ("alice@login1:2222", LoginTarget("alice", "login1", 2222)),
        ("a.b-c@[2001:db8::1]:22", LoginTarget("a.b-c", "2001:db8::1", 22)),
        ("[2001:db8::1]", LoginTarget(None, "2001:db8::1", 22)),
        ("2001:db8::1", LoginTarget(None, "2001:db8::1", 22)),
        ("10.0.0.1:22", LoginTarget(None, "10.0.0.1", 22)),
    ],
)
def test_parse_login(text: str, expected: LoginTarget) -> None:
    assert parse_login(text) == expected
    assert parse_login(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "@host", "alice@", "alice@host:", "alice@host:0", "al ice@host", "host:x"]
)
def test_parse_login_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_login(text)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("[exit]\nbogus = 1\n", "bogus in {conf}: unknown key in [exit]"),
        ("[exit]\nheartbeet = 1\n", "did you mean heartbeat?"),
        ("[exit]\nallow-plain = true\n", "TOML keys use '_': allow_plain"),
        ("[exits]\nheartbeat = 1\n", "{conf}: unknown table [exits]"),
        ("heartbeat = 1\n", "heartbeat in {conf}: keys belong in the [exit] table"),
        ("exit = 1\n", "exit in {conf}: must be a table [exit]"),
        ("[exit]\nconfig = 'x'\n", "config in {conf}: --config can only be given"),
        ("[exit]\nheartbeat = 'x'\n", "heartbeat in {conf}: expected a number, got string"),
        ("[exit]\nallow_plain = 1\n", "allow_plain in {conf}: expected true or false"),
        (
            "[exit]\nallow = 8\n",
            "allow in {conf}: expected an array (one entry per --allow) or one string, got integer",
        ),
        ("[exit]\nallow = '10.0.0.0/33'\n", "allow in {conf}: bad rule '10.0.0.0/33': "),
        ("[exit]\nallow = [1]\n", "allow in {conf}: expected a string (rule), got integer"),
        ("[exit]\nlisten = 80\n", "listen in {conf}: expected a string HOST:PORT, got integer"),
        ("[exit]\nlisten = 'nohost'\n", "listen in {conf}: bad address 'nohost'"),
        ("[exit]\nmetrics = '[::1'\n", "metrics in {conf}: bad address '[::1'"),
        ("[exit]\nlog_format = 'xml'\n", "log_format in {conf}: must be one of text, json"),
        ("[exit]\nheartbeat = -1\n", "heartbeat in {conf}: must be > 0 (got -1)"),
        (
            "[exit]\nallow = ['10.0.0.0/8', '10.0.0.0/33']\n",
            "allow in {conf}: bad rule '10.0.0.0/33': ",
        ),
        ("[exit]\nmax_streams = 1979-05-27\n", "max_streams in {conf}: expected an integer"),
        ("[exit]\n[exit.allow]\n", "allow in {conf}: expected an array"),
        ("[worker]\nsocks = '127.0.0.1:1'\n", "{conf}: no [exit] table"),
        ("[exit]\nheartbeat = \n", "{conf}: invalid TOML: "),
        ("[exit]\nheartbeat = 1\nheartbeat = 2\n", "line 3"),
        ("[exit]\nweird\\nkey = 1\n", "{conf}: invalid TOML"),
        ('[exit]\n"we\\nird" = 1\n', "'we\\nird' in {conf}: unknown key"),
    ],
)
def test_file_errors(tmp_path: Path, keys: Path, body: str, expect: str) -> None:
    conf = write(tmp_path / "exit.toml", body)
    msg = raises(load_exit_config, ["--config", str(conf), "--keys", str(keys)])
    assert expect.format(conf=conf) in msg


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "bad.toml", '[exit]\nlisten = "0.0.0.0:80"\nallow = [\n  "a",,\n]\n')
    msg = raises(load_exit_config, ["--config", str(conf)])
    assert str(conf) in msg and "line 4" in msg


def test_toml_not_utf8(tmp_path: Path) -> None:
    conf = write(tmp_path / "bad.toml", b"[exit]\n# \xff\n")
    assert raises(load_exit_config, ["--config", str(conf)]) == f"{conf}: not valid UTF-8 (line 2)"


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--listen", "nohost"], "--listen: bad address 'nohost': expected HOST:PORT"),
        (["--allow", "10.0.0.0/33"], "--allow: bad rule '10.0.0.0/33': "),
        (["--allow", ".ok.example", "--allow", "bad rule"], "--allow: bad rule 'bad rule'"),
        (["--log-level", "trace"], "--log-level: must be one of debug, info, warning, error"),
        (["--metrics", "[::1]:99999"], "--metrics: bad address '[::1]:99999'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--heart", "3"], "unrecognized arguments: --heart"),
        (["--heartbeat"], "--heartbeat: expected one argument"),
        (["stray"], "unrecognized arguments: stray"),
        (["--allow-plain=yes"], "--allow-plain"),
    ],
)
def test_flag_errors(keys: Path, flags: list[str], expect: str) -> None:
    assert expect in raises(load_exit_config, ["--keys", str(keys), *flags])


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_worker_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--no-socks-auth" in out and "--replay-buffer SIZE" in out
    assert "--carriers N" in out and "(default: 2)" in out
    help_text = build_parser("relay-exit", EXIT_OPTIONS).format_help()
    assert "--allow RULE" in help_text and "(default: 4MiB)" in help_text
    assert "--max-carriers N" in help_text and "--max-carriers-per-key N" in help_text


def test_secret_file_mode(tmp_path: Path, wfiles: dict[str, Path]) -> None:
    leaky = write(tmp_path / "leaky", SECRET, 0o644)
    msg = raises(load_worker_config, worker_argv(wfiles, "--secret-file", str(leaky)))
    assert msg == f"--secret-file: {leaky} is readable by others (chmod 600 {leaky})"
    assert SECRET not in msg

    conf = write(tmp_path / "exit.toml", f'[exit]\nkeys = "{leaky}"\n')
    msg = raises(load_exit_config, ["--config", str(conf)])
    assert msg == f"keys in {conf}: {leaky} is readable by others (chmod 600 {leaky})"

    leaky.chmod(0o620)
    assert "is writable by group" in raises(load_exit_config, ["--keys", str(leaky)])
    leaky.chmod(0o640)
    assert "is readable by group" in raises(load_exit_config, ["--keys", str(leaky)])
    leaky.chmod(0o700)
    load_exit_config(["--keys", str(leaky)])  # owner bits are the owner's business


def test_missing_and_unreadable_files(tmp_path: Path, keys: Path, wfiles: dict[str, Path]) -> None:
    missing = tmp_path / "nope"
    assert raises(load_exit_config, ["--keys", str(missing)]) == (
        f"--keys: cannot read {missing}: No such file or directory"
    )
    assert raises(load_exit_config, ["--config", str(missing)]).startswith(
        f"--config: cannot read {missing}"
    )
    assert raises(load_exit_config, ["--keys", str(tmp_path)]) == (
        f"--keys: {tmp_path} is not a regular file"
    )
    msg = raises(load_worker_config, worker_argv(wfiles, "--known-hosts", str(missing)))
    assert msg.startswith(f"--known-hosts: cannot read {missing}")
    msg = raises(load_worker_config, worker_argv(wfiles, "--known-hosts", str(tmp_path)))
    assert msg.startswith(f"--known-hosts: cannot read {tmp_path}")
    conf = write(tmp_path / "w.toml", '[worker]\nknown_hosts = "no/such/file"\n')
    msg = raises(load_worker_config, ["--config", str(conf), *worker_argv(wfiles)])
    assert msg.startswith(f"known_hosts in {conf}: cannot read {tmp_path / 'no/such/file'}")


def test_path_through_a_file(tmp_path: Path, wfiles: dict[str, Path]) -> None:
    """Unreadable even for root: a path that runs through a regular file."""
    bad = wfiles["known"] / "child"
    msg = raises(load_worker_config, worker_argv(wfiles, "--known-hosts", str(bad)))
    assert msg == f"--known-hosts: cannot read {bad}: Not a directory"
    assert raises(load_keys, bad) == f"--keys: cannot read {bad}: Not a directory"


def test_permission_denied_becomes_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores modes, so EACCES is injected to check its translation."""
    path = write(tmp_path / "s", SECRET)

    def denied(*args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    assert raises(load_secret, path) == f"--secret-file: cannot read {path}: Permission denied"


def test_exit_requires_keys(tmp_path: Path) -> None:
    assert raises(load_exit_config, []).startswith("missing --keys (TOML keys)")
    conf = write(tmp_path / "exit.toml", "[exit]\nheartbeat = 3\n")
    assert raises(load_exit_config, ["--config", str(conf)]).startswith(
        f"missing --keys (keys in {conf})"
    )


@pytest.mark.parametrize(
    ("drop", "expect"),
    [
        ("--exit", "missing --exit"),
        ("--key-id", "missing --key-id"),
        ("--secret-file", "missing --secret-file"),
    ],
)
def test_worker_required(wfiles: dict[str, Path], drop: str, expect: str) -> None:
    argv = worker_argv(wfiles)
    i = argv.index(drop)
    del argv[i : i + 2]
    assert raises(load_worker_config, argv).startswith(expect)


def test_ssh_key_is_required_by_asyncssh_only(wfiles: dict[str, Path]) -> None:
    """ssh finds its key in ~/.ssh/config (or an agent, a certificate); asyncssh cannot."""
    argv = worker_argv(wfiles)
    i = argv.index("--ssh-key")
    del argv[i : i + 2]
    cfg = load_worker_config(argv)
    assert cfg["ssh_client"] == "openssh" and cfg["ssh_key"] is None
    message = raises(load_worker_config, [*argv, "--ssh-client", "asyncssh"])
    assert message.startswith("missing --ssh-key")
    assert raises(load_worker_config, [*argv, "--ssh-client", "putty"]).startswith(
        "--ssh-client: must be one of openssh, asyncssh"
    )


def test_worker_socks_auth_exactly_one(tmp_path: Path, wfiles: dict[str, Path]) -> None:
    argv = worker_argv(wfiles)
    argv.remove("--no-socks-auth")
    msg = raises(load_worker_config, argv)
    assert "--socks-auth" in msg and "--no-socks-auth" in msg and msg.startswith("missing")
    msg = raises(
        load_worker_config, [*argv, "--socks-auth", str(wfiles["auth"]), "--no-socks-auth"]
    )
    assert msg == "--socks-auth and --no-socks-auth are both set: give exactly one"
    conf = write(
        tmp_path / "w.toml",
        f'[worker]\nsocks_auth = "{wfiles["auth"]}"\nno_socks_auth = true\n',
    )
    msg = raises(load_worker_config, ["--config", str(conf), *argv])
    assert msg == (
        f"socks_auth in {conf} and no_socks_auth in {conf} are both set: give exactly one"
    )
    assert load_worker_config([*argv, "--socks-auth", str(wfiles["auth"])])["socks_auth"]


def test_worker_bad_values(wfiles: dict[str, Path]) -> None:
    msg = raises(load_worker_config, worker_argv(wfiles, "--key-id", SECRET + " x"))
    assert msg.startswith("--key-id: key id must be") and SECRET not in msg
    msg = raises(load_worker_config, worker_argv(wfiles, "--login", "bad host"))
    assert msg.startswith("--login: bad login 'bad host'")
    msg = raises(load_worker_config, worker_argv(wfiles, "--upstream", "http://proxy:3128"))
    assert msg.startswith("--upstream: expected socks5://HOST:PORT")
    msg = raises(
        load_worker_config, worker_argv(wfiles, "--upstream", f"socks5://u:{SECRET}@dante:1080")
    )
    assert msg.startswith("--upstream: credentials") and SECRET not in msg
    msg = raises(load_worker_config, worker_argv(wfiles, "--upstream", "socks5://dante"))
    assert msg.startswith("--upstream: bad address 'socks5://dante'")


def test_secrets_never_in_messages(tmp_path: Path) -> None:
    bad_files = {
        "swapped": f"{SECRET}\n",
        "three": f"k1 {SECRET} trailing\n",
        "badid": f"{SECRET}! {SECRET2}\n",
        "dup": f"k1 {SECRET}\nk1 {SECRET2}\n",
    }
    for name, body in bad_files.items():
        path = write(tmp_path / name, body)
        for func in (load_keys, load_secret, load_userpass):
            try:
                func(path)
            except ConfigError as exc:
                assert SECRET not in str(exc) and SECRET2 not in str(exc), (name, func)
        conf = write(tmp_path / "exit.toml", f'[exit]\nkeys = "{path}"\nsecret = "{SECRET}"\n')
        assert SECRET not in raises(load_exit_config, ["--config", str(conf)])
    conf = write(tmp_path / "exit.toml", f'[exit]\nheartbeat = "{SECRET}"\n')
    assert SECRET not in raises(load_exit_config, ["--config", str(conf)])


# --------------------------------------------------------------------------- secrets


def test_load_keys(keys: Path) -> None:
    assert load_keys(keys) == {"k1": SECRET.encode(), "k2": SECRET2.encode()}
    utf = write(keys.parent / "utf", "u\tsecret-with-ünïcode\n")
    assert load_keys(utf) == {"u": "secret-with-ünïcode".encode()}


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (f"k1 {SECRET}\nk1 {SECRET2}\n", "line 2: duplicate key id 'k1' (first on line 1)"),
        ("k1\n", "line 1: expected 'KEY_ID SECRET'"),
        (f"# c\nk1 {SECRET} extra\n", "line 2: expected 'KEY_ID SECRET'"),
        (f"k/1 {SECRET}\n", "line 1: key id must be"),
        (f"{'k' * 65} {SECRET}\n", "line 1: key id must be"),
        ("k1 short\n", "line 1: secret is shorter than 16 bytes (got 5)"),
        ("# only comments\n\n", "holds no 'KEY_ID SECRET' line"),
        (b"k1 \xff" + b"x" * 20 + b"\n", "line 1: not valid UTF-8"),
        (f"k1 {SECRET}\x00\n", "line 1: secret contains a control character (byte 0x00)"),
        (f"k1 {SECRET}\x7f\n", "line 1: secret contains a control character (byte 0x7f)"),
    ],
)
def test_load_keys_rejects(tmp_path: Path, body: str | bytes, expect: str) -> None:
    path = write(tmp_path / "keys", body)
    msg = raises(load_keys, path)
    assert msg.startswith(f"--keys: {path}") and expect in msg
    assert SECRET not in msg and SECRET2 not in msg


def test_load_keys_checks_privacy_first(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", "garbage\n", 0o604)
    assert raises(load_keys, path, "keys in x.toml") == (
        f"keys in x.toml: {path} is readable by others (chmod 600 {path})"
    )
    assert raises(load_keys, tmp_path / "missing").startswith("--keys: cannot read")


def test_load_secret(tmp_path: Path) -> None:
    path = write(tmp_path / "s", f"\n  {SECRET}\r\n\n")
    assert load_secret(path) == SECRET.encode()
    for body, expect in [
        ("short\n", "shorter than 16 bytes (got 5)"),
        (f"k1 {SECRET}\n", "contains whitespace"),
        ("", "shorter than 16 bytes (got 0)"),
        (f"{SECRET}\x00", "control character (byte 0x00)"),
        (f"\x1b{SECRET}", "control character (byte 0x1b)"),
    ]:
        write(path, body)
        msg = raises(load_secret, path)
        assert msg.startswith(f"--secret-file: {path}") and expect in msg and SECRET not in msg
    path.chmod(0o644)
    assert "readable by others" in raises(load_secret, path)


def test_load_userpass(tmp_path: Path) -> None:
    path = write(tmp_path / "auth", f"glidein:{PASSWORD}\n")
    assert load_userpass(path) == ("glidein", PASSWORD)
    write(path, "ü:" + "p" * 255)
    assert load_userpass(path, "--upstream-auth") == ("ü", "p" * 255)
    for body, expect in [
        ("", "is empty"),
        ("\n", "is empty"),
        (f"nocolon{SECRET}\n", "no ':' found"),
        (f":{SECRET}\n", "user must be 1..255 bytes (got 0)"),
        ("user:\n", "password must be 1..255 bytes (got 0)"),
        (f"user:{'p' * 256}\n", "password must be 1..255 bytes (got 256)"),
        (f"{'ü' * 128}:{SECRET}", "user must be 1..255 bytes (got 256)"),
        (f"a:{SECRET}\nb:{SECRET2}\n", "exactly one line"),
    ]:
        write(path, body)
        msg = raises(load_userpass, path, "--upstream-auth")
        assert msg.startswith(f"--upstream-auth: {path}") and expect in msg
        assert SECRET not in msg and SECRET2 not in msg


def test_check_private(tmp_path: Path) -> None:
    path = write(tmp_path / "p", "x", 0o600)
    check_private(path, "--x")
    path.chmod(0o601)
    assert raises(check_private, path, "--x") == (
        f"--x: {path} is accessible by others (chmod 600 {path})"
    )
    os.mkfifo(tmp_path / "fifo", 0o600)
    assert "is not a regular file" in raises(check_private, tmp_path / "fifo", "--x")
    assert "is not a regular file" in raises(load_secret, tmp_path / "fifo")  # does not block
    link = tmp_path / "link"
    link.symlink_to(path)
    path.chmod(0o600)
    check_private(link, "--x")  # the target's mode is what matters


# --------------------------------------------------------------------------- properties

_KEY_NAMES = [o.key for o in (*EXIT_OPTIONS, *WORKER_OPTIONS)] + ["bogus", "allow-plain"]
_VALUES = [
    "1",
    "-1",
    "0",
    "2.5",
    "1e400",
    "nan",
    "true",
    '""',
    '"x"',
    '"0.0.0.0:80"',
    '"[::1]:0"',
    '"4MiB"',
    '"10.0.0.0/33"',
    '".example.org:443"',
    '"socks5://h:1"',
    '"socks5://u:p@h:1"',
    '"/dev/null"',
    '"."',
    '"~nosuchuser/x"',
    '"\\u0000"',
    "[]",
    '["a", 1]',
    '["10.0.0.0/8", ".x.org"]',
    "{}",
    "{ a = 1 }",
    "1979-05-27",
    "[[1]]",
]
_LINES = st.one_of(
    st.sampled_from(["[exit]", "[worker]", "[other]", "[exit.allow]", "[[exit]]", ""]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(_KEY_NAMES), st.sampled_from(_VALUES)),
    st.text(max_size=20),
)


def _only_config_errors(tmp: pytest.TempPathFactory, data: bytes) -> None:
    conf = tmp.getbasetemp() / "fuzz.toml"
    conf.write_bytes(data)
    for load in (load_exit_config, load_worker_config):
        try:
            load(["--config", str(conf)])
        except ConfigError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _only_config_errors(tmp_path_factory, text.encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_arbitrary_bytes_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    _only_config_errors(tmp_path_factory, data)


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINES, max_size=12))
def test_toml_shaped_text_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str]
) -> None:
    _only_config_errors(tmp_path_factory, "\n".join(lines).encode("utf-8"))


def test_workers_key_and_its_errors_name_the_key_and_file(tmp_path: Path, keys: Path) -> None:
    assert load_exit_config(["--keys", str(keys)])["workers"] == 1
    conf = write(tmp_path / "w.toml", f'[exit]\nkeys = "{keys}"\nworkers = 4\n')
    assert load_exit_config(["--config", str(conf)])["workers"] == 4
    for body, words in (
        ("workers = 0", "workers"),
        ("workers = 65", "at most 64"),
    ):
        conf = write(tmp_path / "w.toml", f'[exit]\nkeys = "{keys}"\n{body}\n')
        with pytest.raises(ConfigError) as err:
            load_exit_config(["--config", str(conf)])
        assert "workers in " + str(conf) in str(err.value) and words in str(err.value)

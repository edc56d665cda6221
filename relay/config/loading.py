"""Loading the schema's options from a TOML file and command-line flags.

Precedence is defaults < ``--config`` file < flags; a repeatable flag given on the command
line replaces the file's list.  Every problem becomes a one-line
:class:`~relay.errors.ConfigError` naming the option as the operator wrote it
(``--heartbeat`` for a flag, ``heartbeat in /etc/relay/exit.toml`` for the
file), because a daemon on a batch node has nobody to ask what went wrong.
Relative file names in the TOML file are taken relative to that file's
directory (daemons are often started from ``/``); on the command line, relative
to the working directory, as a shell user expects.

The result is a plain mapping, option key to parsed value, holding every option of the
table (``config``: the file given, or None); the daemons' settings are built from it.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from relay.config.schema import EXIT_OPTIONS, KIND_METAVAR, WORKER_OPTIONS, Option
from relay.config.secrets import KEY_ID_RE, check_private
from relay.config.values import (
    PolicyError,
    check_host,
    parse_fingerprint,
    parse_forward,
    parse_hostport,
    parse_login,
    parse_rule,
    parse_size,
    parse_upstream,
    toml_type,
)
from relay.errors import ConfigError
from relay.proto.handoff import MAX_PROCESSES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on old interpreters only
    import tomli as tomllib

__all__ = [
    "Values",
    "build_parser",
    "default_value",
    "load_exit_config",
    "load_worker_config",
]

Values = dict[str, Any]
"""Option key to parsed value, one entry per option of a table."""


# --------------------------------------------------------------------------- conversion


def _err(text: str) -> ConfigError:
    """ConfigError messages are one line: operators grep logs for them."""
    return ConfigError(" ".join(text.splitlines()))


@dataclass(frozen=True)
class _Source:
    """Where a value came from: decides how errors name it and where relative paths start."""

    label: str  # "--heartbeat" / "heartbeat in /etc/relay/exit.toml" / "default of --x"
    base: Path | None = None  # directory for relative paths (the config file's)
    flag: bool = False  # flag values are text; TOML values must already have the right type


_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "hostport": "a string HOST:PORT",
    "path": "a string (file name)",
    "secret-path": "a string (file name)",
    "rule": "a string (rule)",
    "login": "a string [USER@]HOST[:PORT]",
    "choice": "a string",
    "size": "an integer or a string like '4MiB'",
}


def _bad_type(opt: Option, value: object, src: _Source) -> ConfigError:
    """A value of the wrong TOML type; the value is not echoed (it might be a secret)."""
    return _err(f"{src.label}: expected {_EXPECTED[opt.kind]}, got {toml_type(value)}")


def _check_min(opt: Option, number: float, raw: object, src: _Source) -> None:
    """Apply the schema's lower bound, quoting the value as the operator wrote it."""
    if opt.min is None:
        return
    if number < opt.min or (opt.min_exclusive and number == opt.min):
        op = ">" if opt.min_exclusive else ">="
        raise _err(f"{src.label}: must be {op} {opt.min:g} (got {raw})")


def _to_number(opt: Option, raw: object, src: _Source) -> int | float:
    """int/float options: TOML numbers or flag text; an int option takes 2.0 but not 2.5."""
    number: int | float
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise _bad_type(opt, raw, src)
    if isinstance(raw, str) and not src.flag:
        raise _bad_type(opt, raw, src)  # not echoed: the value might be a misplaced secret
    if isinstance(raw, str):
        try:
            number = int(raw)
        except ValueError:
            try:
                number = float(raw)
            except ValueError:
                raise _err(f"{src.label}: expected {_EXPECTED[opt.kind]} (got {raw!r})") from None
    else:
        number = raw
    if isinstance(number, float) and not math.isfinite(number):
        raise _err(f"{src.label}: must be a finite number (got {raw})")
    if opt.kind == "int":
        if isinstance(number, float):
            if not number.is_integer():
                raise _err(f"{src.label}: must be a whole number (got {raw})")
            number = int(number)
    else:
        number = float(number)
    _check_min(opt, number, raw, src)
    return number


def _to_path(opt: Option, text: str, src: _Source) -> Path:
    """Resolve a file name (``~`` expanded, file-relative from the file) and check it now.

    Checking at load time turns a typo into a start-up error instead of a failure
    hours later when the first reconnect needs the file.
    """
    if not text or "\0" in text:
        raise _err(f"{src.label}: expected a file name (got {text!r})")
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise _err(f"{src.label}: cannot expand ~ in {text!r}") from None
    if src.base is not None and not path.is_absolute():
        path = src.base / path
    if opt.kind == "secret-path":
        check_private(path, src.label)
        return path
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _err(f"{src.label}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def _convert_one(opt: Option, raw: object, src: _Source) -> object:
    """Turn one flag string or TOML value into the option's Python type, or raise."""
    kind = opt.kind
    if kind in ("int", "float"):
        return _to_number(opt, raw, src)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise _bad_type(opt, raw, src)
        return raw
    if kind == "size":
        try:
            size = parse_size(raw)
        except TypeError:
            raise _bad_type(opt, raw, src) from None
        except ValueError as exc:
            raise _err(f"{src.label}: {exc} (got {raw!r})") from None
        _check_min(opt, size, repr(raw), src)
        return size
    if not isinstance(raw, str):
        raise _bad_type(opt, raw, src)
    if kind in ("path", "secret-path"):
        return _to_path(opt, raw, src)
    if kind == "str":
        return _convert_str(opt, raw, src)
    if kind == "choice":
        if raw not in opt.choices:
            raise _err(f"{src.label}: must be one of {', '.join(opt.choices)} (got {raw!r})")
        return raw
    if kind == "hostport":
        try:
            return parse_hostport(raw, 1 if opt.min is None else int(opt.min))
        except ValueError as exc:
            raise _err(f"{src.label}: bad address {raw!r}: {exc}") from None
    if kind == "login":
        try:
            return parse_login(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: bad login {raw!r}: {exc}") from None
    if kind == "rule":
        try:
            return parse_rule(raw)
        except (PolicyError, ValueError) as exc:
            reason = str(exc).removeprefix(f"invalid rule {raw!r}: ")  # policy quotes it too
            raise _err(f"{src.label}: bad rule {raw!r}: {reason}") from None
    raise AssertionError(f"option {opt.name} has unknown kind {kind!r}")


def _convert_str(opt: Option, raw: str, src: _Source) -> object:
    """Free-text options, with the few that have a shape of their own checked here."""
    if opt.name == "upstream":
        try:
            return parse_upstream(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: {exc}") from None
    if opt.name == "forward":
        try:
            return parse_forward(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: bad forward {raw!r}: {exc}") from None
    if opt.name == "exit-fingerprint":
        try:
            return parse_fingerprint(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: {exc} (got {raw!r})") from None
    if opt.name == "exit-server-name":
        problem = check_host(raw)
        if problem:
            raise _err(f"{src.label}: {problem} (got {raw!r})")
        return raw
    if opt.name == "key-id":
        # Not echoed: a secret pasted into the wrong field must not reach the logs.
        if not KEY_ID_RE.fullmatch(raw):
            raise _err(f"{src.label}: key id must be 1-64 characters from A-Z a-z 0-9 . _ -")
        return raw
    if not raw:
        raise _err(f"{src.label}: must not be empty")
    return raw


def _convert(opt: Option, raw: object, src: _Source) -> object:
    """Convert a whole value; repeatable options become tuples (configs are immutable).

    A repeatable key given one string (``exit = "exit.example.org:80"``) means that one
    entry, as the flag given once does."""
    if raw is None:
        return None
    if not opt.repeatable:
        return _convert_one(opt, raw, src)
    if isinstance(raw, tuple):  # a schema default
        raw = list(raw)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise _err(
            f"{src.label}: expected an array (one entry per {opt.flag}) or one string, "
            f"got {toml_type(raw)}"
        )
    return tuple(_convert_one(opt, item, src) for item in raw)


@functools.cache
def default_value(opt: Option) -> Any:
    """The schema default of ``opt`` as the loader turns it into a value (``"4MiB"``: bytes)."""
    return _convert(opt, opt.default, _Source(f"default of {opt.flag}"))


# --------------------------------------------------------------------------- front ends


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise ConfigError, so the CLI reports them like file errors."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting 2."""
        raise _err(message)


def _help_text(opt: Option) -> str:
    """Option help plus its default and repeatability, escaped for argparse's % formatting."""
    text = opt.help
    if opt.repeatable:
        text += f" (repeatable; TOML: {opt.key} = [...])"
    if opt.default not in (None, False, ()):
        shown = f"{opt.default:g}" if isinstance(opt.default, float) else opt.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def build_parser(prog: str, options: Sequence[Option]) -> argparse.ArgumentParser:
    """The flag front end of the schema; values stay raw strings and are parsed by the loader.

    Defaults are suppressed so the loader can tell a flag that was given from one
    that was not, which the file-then-flags precedence needs.  Abbreviations are
    off: ``--heart`` silently meaning ``--heartbeat`` is a trap in job scripts.
    """
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        epilog="Every option but --config can also be set in the --config TOML file, with the"
        " flag name as key ('_' for '-'); repeatable options are arrays there (or one"
        " string for one entry). Flags override the file.",
    )
    for opt in options:
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.key, action="store_true", help=_help_text(opt))
            continue
        metavar = opt.metavar
        if metavar is None:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else KIND_METAVAR[opt.kind]
        parser.add_argument(
            opt.flag,
            dest=opt.key,
            action="append" if opt.repeatable else "store",
            metavar=metavar,
            help=_help_text(opt),
        )
    return parser


def _suggest(key: str, known: Sequence[str]) -> str:
    """A 'did you mean' hint: most unknown keys are typos or dashes for underscores."""
    if key.replace("-", "_") in known:
        return f"; TOML keys use '_': {key.replace('-', '_')}"
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _show_key(key: str) -> str:
    """Key as written, quoted when it has characters that would break the one-line message."""
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else repr(key)


def _read_table(path: Path, table: str, other: str, options: Sequence[Option]) -> dict[str, object]:
    """Read the ``[table]`` of a TOML file, rejecting anything the schema does not know.

    The other daemon's table is tolerated so that one file may configure both ends,
    but a file with only the other daemon's table is refused: it is the wrong file.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _err(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _err(f"{path}: not valid UTF-8 (line {line})") from None
    try:
        doc = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise _err(f"{path}: invalid TOML: {exc}") from None
    for name, value in doc.items():
        if name in (table, other):
            if not isinstance(value, dict):
                raise _err(f"{name} in {path}: must be a table [{name}]")
        elif isinstance(value, dict):
            raise _err(f"{path}: unknown table [{_show_key(name)}] (expected [{table}])")
        else:
            raise _err(f"{_show_key(name)} in {path}: keys belong in the [{table}] table")
    if table not in doc and other in doc:
        raise _err(f"{path}: no [{table}] table (its [{other}] table is for relay-{other})")
    section: dict[str, object] = doc.get(table, {})
    known = [o.key for o in options if o.name != "config"]
    for key in section:
        if key == "config":
            raise _err(f"config in {path}: --config can only be given on the command line")
        if key not in known:
            raise _err(
                f"{_show_key(key)} in {path}: unknown key in [{table}]{_suggest(key, known)}"
            )
    return section


@dataclass
class _Loaded:
    """Converted values plus where each came from, for cross-field error messages."""

    values: dict[str, Any]
    labels: dict[str, str]  # key -> label, only for values that were given
    levels: dict[str, int]  # key -> 0 default, 1 file, 2 flag
    config_file: Path | None

    def name(self, opt: Option) -> str:
        """Name an option in a cross-field error: as given, or as flag and key if unset."""
        if opt.key in self.labels:
            return self.labels[opt.key]
        where = f"{opt.key} in {self.config_file}" if self.config_file else f"TOML {opt.key}"
        return f"{opt.flag} ({where})"


def _load(
    prog: str, table: str, other: str, options: Sequence[Option], argv: Sequence[str]
) -> _Loaded:
    """Merge defaults < file < flags and convert every option."""
    flags = vars(build_parser(prog, options).parse_args(list(argv)))
    config_file: Path | None = None
    section: dict[str, object] = {}
    if "config" in flags:
        config_file = Path(flags["config"]).expanduser()
        section = _read_table(config_file, table, other, options)
    loaded = _Loaded({}, {}, {}, config_file)
    for opt in options:
        if opt.name == "config":
            loaded.values[opt.key] = config_file
            continue
        if opt.key in flags:
            raw, src, level = flags[opt.key], _Source(opt.flag, flag=True), 2
        elif opt.key in section and config_file is not None:
            raw, level = section[opt.key], 1
            src = _Source(f"{opt.key} in {config_file}", config_file.parent)
        else:
            raw, src, level = opt.default, _Source(f"default of {opt.flag}"), 0
        loaded.values[opt.key] = _convert(opt, raw, src)
        loaded.levels[opt.key] = level
        if level:
            loaded.labels[opt.key] = src.label
    return loaded


def _option(options: Sequence[Option], name: str) -> Option:
    """Look an option up by flag name (cross-field checks refer to them by name)."""
    return next(o for o in options if o.name == name)


def load_exit_config(argv: Sequence[str]) -> Values:
    """Parse relay-exit's flags and ``--config`` file into the values of :data:`EXIT_OPTIONS`."""
    loaded = _load("relay-exit", "exit", "worker", EXIT_OPTIONS, argv)
    v = loaded.values
    if v["keys"] is None:
        keys = _option(EXIT_OPTIONS, "keys")
        raise _err(f"missing {loaded.name(keys)}: {keys.help}")
    cert, key = _option(EXIT_OPTIONS, "tls-cert"), _option(EXIT_OPTIONS, "tls-key")
    if (v[cert.key] is None) != (v[key.key] is None):
        given, other = (cert, key) if v[key.key] is None else (key, cert)
        raise _err(f"{loaded.name(given)} needs {loaded.name(other)}: TLS needs both")
    workers = _option(EXIT_OPTIONS, "workers")
    if v["workers"] > MAX_PROCESSES:
        raise _err(f"{loaded.name(workers)} is {v['workers']}: at most {MAX_PROCESSES}")
    if v["workers"] > 1 and not sys.platform.startswith("linux"):
        raise _err(f"{loaded.name(workers)} above 1 needs Linux (SO_REUSEPORT)")
    return v


def load_worker_config(argv: Sequence[str]) -> Values:
    """Parse relay-worker's flags and ``--config`` file into the values of
    :data:`WORKER_OPTIONS`.

    Cross-field rules: exactly one of --socks-auth / --no-socks-auth (a flag beats
    the file's choice of the other); without --upstream, --exit, --key-id and
    --secret-file; --ssh-key whenever --login with --ssh-client asyncssh. Without --login the
    exit (or upstream) is dialled directly.
    """
    loaded = _load("relay-worker", "worker", "exit", WORKER_OPTIONS, argv)
    v = loaded.values

    def opt(name: str) -> Option:
        return _option(WORKER_OPTIONS, name)

    def missing(name: str, why: str) -> ConfigError:
        return _err(f"missing {loaded.name(opt(name))}: {why}")

    auth, no_auth = opt("socks-auth"), opt("no-socks-auth")
    if v[auth.key] is not None and v[no_auth.key]:
        auth_level, no_auth_level = loaded.levels[auth.key], loaded.levels[no_auth.key]
        if auth_level > no_auth_level:
            v[no_auth.key] = False
        elif no_auth_level > auth_level:
            v[auth.key] = None
        else:
            raise _err(
                f"{loaded.name(auth)} and {loaded.name(no_auth)} are both set: give exactly one"
            )
    elif v[auth.key] is None and not v[no_auth.key]:
        raise _err(
            f"missing {loaded.name(auth)} or {loaded.name(no_auth)}: local SOCKS5 clients need"
            " a password file, or the explicit choice to go without"
        )
    if v["upstream"] is None:
        if not v["exit"]:
            raise missing("exit", "at least one exit address is needed unless --upstream")
        if v["key_id"] is None:
            raise missing("key-id", "the exit needs it to look up this worker's secret")
        if v["secret_file"] is None:
            raise missing("secret-file", "the exit needs proof of the key id")
    if v["login"] and v["ssh_key"] is None and v["ssh_client"] == "asyncssh":
        raise missing("ssh-key", "--ssh-client asyncssh needs it to log in to the --login nodes")
    tls_given = [o for o in ("exit-ca", "exit-fingerprint", "exit-server-name") if v[opt(o).key]]
    if tls_given and v["upstream"] is not None:
        raise _err(
            f"{loaded.name(opt(tls_given[0]))} is for a TLS relay-exit, not --upstream"
            " (a plain SOCKS5 server)"
        )
    if v["exit_server_name"] is not None and v["exit_ca"] is None:
        raise missing("exit-ca", "--exit-server-name names what the CA-signed certificate"
                      " must say; a pinned fingerprint needs no name")  # fmt: skip
    return v

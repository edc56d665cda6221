"""The configuration reference, generated from the option schema so it cannot drift.

``python -m relay.config.doc > docs/CONFIG.md`` (or ``make docs``) writes it; a test fails when
the committed file differs from what this prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from relay.config.schema import (
    CHECK_OPTIONS,
    EXIT_OPTIONS,
    KIND_METAVAR,
    WORKER_OPTIONS,
    Option,
)

__all__ = ["generate", "main"]

_KIND = {
    "str": "text",
    "int": "integer",
    "float": "number",
    "bool": "switch",
    "hostport": "HOST:PORT",
    "path": "file",
    "secret-path": "private file (mode 0600)",
    "rule": "rule",
    "login": "[USER@]HOST[:PORT]",
    "choice": "choice",
    "size": "size",
}

_HEADER = """\
# Configuration reference

<!-- Generated from relay/config/schema.py by `python -m relay.config.doc > docs/CONFIG.md`
     (`make docs`). Do not edit by hand: a test compares this file with the generator. -->

Every option of `relay-exit` and `relay-worker` is both a command-line flag `--NAME` and a
key of the TOML file given with `--config` (table `[exit]` or `[worker]`; the key is the
flag name with `_` for `-`). A repeatable option is an array in the file, or one string for
one entry (`exit = "exit.example.org:80"`). Precedence: built-in default < file < flag; a
repeatable flag on the command line replaces the file's array. Relative file names in the
TOML file are relative to that file's directory. An unknown key, a bad value or a secret
file that group or others can read stops the daemon with exit code 2 and one line naming
the key and the file.

Value types: *HOST:PORT* (IPv6 in brackets, `[2001:db8::1]:443`); *size* is bytes or a
number with `KiB`, `MiB`, `GiB`; a *switch* is a flag without value (`true`/`false` in
TOML); a *rule* is `CIDR[:PORTS]` or `.domain.suffix[:PORTS]` with PORTS `N`, `N-M` or `*`;
a *private file* must not be readable or writable by group or others.
"""


def _cell(text: str) -> str:
    """Table cell text: pipes escaped, no line breaks."""
    return " ".join(text.replace("|", "\\|").split())


def _default(opt: Option) -> str:
    value = opt.default
    if opt.name == "config":
        return "-"
    if value is None or value == ():
        return "-"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (tuple, list)):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _type(opt: Option, toml: bool = True) -> str:
    kind = _KIND[opt.kind]
    if opt.choices:
        kind = "one of " + ", ".join(f"`{c}`" for c in opt.choices)
    if opt.min is not None and opt.kind in ("int", "float", "size"):
        op = ">" if opt.min_exclusive else "≥"
        kind += f", {op} {opt.min:g}"
    if opt.kind == "hostport" and opt.min == 0:
        kind += ", port 0 = any free port"
    if opt.repeatable:
        kind += "; repeatable (TOML array)" if toml else "; repeatable"
    return kind


def _flag(opt: Option) -> str:
    if opt.kind == "bool":
        return f"`{opt.flag}`"
    metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else None)
    return f"`{opt.flag} {metavar or KIND_METAVAR[opt.kind]}`"


def _table(options: Sequence[Option], toml: bool = True) -> list[str]:
    lines = [
        "| key | flag | type | default | meaning |"
        if toml
        else "| flag | type | default | meaning |",
        "|---|---|---|---|---|" if toml else "|---|---|---|---|",
    ]
    for opt in options:
        key = "-" if opt.name == "config" else f"`{opt.key}`"
        cells = [_flag(opt), _cell(_type(opt, toml)), _default(opt), _cell(opt.help)]
        if toml:
            cells.insert(0, key)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def generate() -> str:
    """The whole reference as Markdown."""
    out = [_HEADER]
    out += ["## relay-exit (`[exit]`)", ""]
    out += _table(EXIT_OPTIONS)
    out += ["", "## relay-worker (`[worker]`)", ""]
    out += _table(WORKER_OPTIONS)
    out += [
        "",
        "## relay check",
        "",
        "`relay check` (also `relay-worker check`) takes every relay-worker option above,",
        "normally through `--config worker.toml`, plus these command-line flags:",
        "",
    ]
    out += _table(CHECK_OPTIONS, toml=False)
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] = ()) -> int:
    sys.stdout.write(generate())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

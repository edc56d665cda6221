"""The configuration reference is generated from the schema; the committed copy must match."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from relay.config.doc import generate
from relay.config.schema import CHECK_OPTIONS, EXIT_OPTIONS, WORKER_OPTIONS

CONFIG_MD = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_committed_reference_matches_the_schema() -> None:
    assert CONFIG_MD.read_text() == generate(), (
        "docs/CONFIG.md is stale: regenerate it with `make docs`"
        " (python -m relay.config.doc > docs/CONFIG.md)"
    )


def test_every_option_has_a_row() -> None:
    text = generate()
    for opt in (*EXIT_OPTIONS, *WORKER_OPTIONS, *CHECK_OPTIONS):
        assert f"`{opt.flag}" in text, opt.name
        if opt.name not in ("config", "probe", "json"):
            assert f"| `{opt.key}` |" in text, opt.key


def test_module_prints_the_reference() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay.config.doc"], capture_output=True, text=True, check=True
    )
    assert out.stdout == generate()


def test_each_option_is_in_its_own_daemons_section() -> None:
    """A key documented under the wrong daemon would be refused as unknown in that table."""
    text = generate()
    exit_part, _, rest = text.partition("## relay-worker (`[worker]`)")
    worker_part, _, check_part = rest.partition("## relay check")
    assert "## relay-exit (`[exit]`)" in exit_part and worker_part and check_part
    exit_keys = {o.key for o in EXIT_OPTIONS if o.name != "config"}
    worker_keys = {o.key for o in WORKER_OPTIONS if o.name != "config"}
    for key in exit_keys:
        assert f"| `{key}` |" in exit_part, key
        if key not in worker_keys:
            assert f"| `{key}` |" not in worker_part, key
    for key in worker_keys:
        assert f"| `{key}` |" in worker_part, key
        if key not in exit_keys:
            assert f"| `{key}` |" not in exit_part, key
    # the carrier options of protocol v2: the worker keeps them, the exit caps them
    assert "| `carriers` |" in worker_part
    assert "| `max_carriers` |" in exit_part and "| `max_carriers_per_key` |" in exit_part
    assert "warm" not in text

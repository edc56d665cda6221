"""The configuration reference is generated from the schema; the committed copy must match."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from relay.check import CHECK_OPTIONS
from relay.config import EXIT_OPTIONS, WORKER_OPTIONS
from relay.configdoc import generate

CONFIG_MD = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def test_committed_reference_matches_the_schema() -> None:
    assert CONFIG_MD.read_text() == generate(), (
        "docs/CONFIG.md is stale: regenerate it with `make docs`"
        " (python -m relay.configdoc > docs/CONFIG.md)"
    )


def test_every_option_has_a_row() -> None:
    text = generate()
    for opt in (*EXIT_OPTIONS, *WORKER_OPTIONS, *CHECK_OPTIONS):
        assert f"`{opt.flag}" in text, opt.name
        if opt.name not in ("config", "probe", "json"):
            assert f"| `{opt.key}` |" in text, opt.key


def test_module_prints_the_reference() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay.configdoc"], capture_output=True, text=True, check=True
    )
    assert out.stdout == generate()

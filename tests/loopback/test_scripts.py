"""scripts/: the helpers of `make test` pass shellcheck, and scripts/pythons picks the oldest
and the newest interpreter and says loudly what is missing."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = sorted(
    p for p in (ROOT / "scripts").iterdir() if p.read_text().startswith("#!/usr/bin/env bash")
)


def test_the_scripts_are_found() -> None:
    assert {"pythons", "test-pythons", "check-dist", "install-debs"} <= {
        p.name for p in SHELL_SCRIPTS
    }


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(script: Path) -> None:
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is not installed (scripts/install-debs installs it)"
    lint = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=info", str(script)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


def _pythons(tmp_path: Path, minors: list[int]) -> subprocess.CompletedProcess[str]:
    """scripts/pythons on a PATH with stand-ins python3.X for ``minors`` and no pyenv."""
    fakes, tools = tmp_path / "fakes", tmp_path / "tools"
    fakes.mkdir()
    tools.mkdir()
    for name in ("dirname", "sed", "seq", "sort", "head", "tail"):
        found = shutil.which(name)
        assert found is not None, name
        (tools / name).symlink_to(found)
    for minor in minors:
        fake = fakes / f"python3.{minor}"
        fake.write_text(f'#!/bin/sh\necho "3 {minor} $0"\n')
        fake.chmod(0o755)
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, str(ROOT / "scripts" / "pythons")],
        capture_output=True,
        text=True,
        env={"PATH": f"{fakes}:{tools}", "HOME": str(tmp_path)},
        check=False,
    )


def test_oldest_and_newest_without_a_warning(tmp_path: Path) -> None:
    proc = _pythons(tmp_path, [9, 10, 12, 13])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == [
        f"3.9 {tmp_path}/fakes/python3.9",
        f"3.13 {tmp_path}/fakes/python3.13",
    ]
    assert proc.stderr == ""


def test_a_missing_floor_is_said_loudly_and_the_oldest_there_is_used(tmp_path: Path) -> None:
    proc = _pythons(tmp_path, [11, 13])
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["3.11", "3.13"]
    assert "WARNING: Python 3.9 (the floor of requires-python) was not found" in proc.stderr
    assert "NOT tested" in proc.stderr


def test_a_single_interpreter_is_said_loudly(tmp_path: Path) -> None:
    proc = _pythons(tmp_path, [9])
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["3.9"]
    assert "WARNING: only one Python (3.9) was found" in proc.stderr


def test_no_interpreter_is_an_error(tmp_path: Path) -> None:
    proc = _pythons(tmp_path, [8])  # below the floor: not a candidate
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "ERROR: no Python >= 3.9" in proc.stderr

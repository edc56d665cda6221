"""Fixtures for every group, and each test's group marker from its directory.

``tests/unit`` runs in memory (no root, no network), ``tests/loopback`` starts real processes
on 127.0.0.1 (sshd needs root), ``tests/lab`` builds network namespaces and nftables (root).
The marker lets ``-m unit`` (``make unit``) or ``-m "not lab"`` pick a group.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support")

pytest_plugins = ("tests.support.helpers", "tests.support.fixtures")

GROUPS = ("unit", "loopback", "lab")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        try:
            group = Path(str(item.fspath)).relative_to(here).parts[0]
        except ValueError:
            continue
        if group not in GROUPS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(GROUPS)}}}/")
        item.add_marker(group)

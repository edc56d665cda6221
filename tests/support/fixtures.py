"""pytest fixtures for the lab; a conftest enables them with `from tests.support.fixtures import *`.

Lab tests need root and network namespaces. They fail (never skip) when those are missing,
because CI runs as root and a silently skipped firewall test would hide the one failure mode the
relay exists for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import Lab, netns_works
from tests.support.sshd import Sshd, start_sshd

__all__ = [
    "lab",
    "lab_login_sshd",
    "require_root",
    "require_root_netns",
    "root_netns",
    "sshd",
]

_netns_problem: list[str | None] = []  # cached result of the (slow-ish) namespace probe


def require_root() -> None:
    """Fail the test unless running as root (sshd privilege separation, root login)."""
    if os.geteuid() != 0:
        pytest.fail(
            f"lab tests need root (euid is {os.geteuid()}); CI runs them as root, "
            "so they fail rather than skip",
            pytrace=False,
        )


def require_root_netns() -> None:
    """Fail the test unless root can create network namespaces and run nft in them."""
    require_root()
    if not _netns_problem:
        _netns_problem.append(netns_works())
    if _netns_problem[0] is not None:
        pytest.fail(
            f"lab tests need working `ip netns` and nftables: {_netns_problem[0]}; "
            "CI runs them, so they fail rather than skip",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def root_netns() -> None:
    """Session-wide check (see require_root_netns); depend on it to fail early and clearly."""
    require_root_netns()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 (free port) as the login node; stopped after the test."""
    require_root()
    server = start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def lab(tmp_path: Path, root_netns: None) -> Iterator[Lab]:
    """The firewall lab with idle_timeout 4 s; closed after the test, also on failure."""
    the_lab = Lab.create(tmp_path / "lab", idle_timeout=4)
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def lab_login_sshd(lab: Lab, tmp_path: Path) -> Iterator[Sshd]:
    """sshd on the lab's login node (192.0.2.1:22, reachable from the worker namespace)."""
    server = start_sshd(tmp_path / "login-sshd", host=lab.login_ip, port=22, netns=lab.login)
    try:
        yield server
    finally:
        server.stop()

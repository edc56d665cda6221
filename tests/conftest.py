"""Shared fixtures: the lab (real sshd, namespaces, nftables) and the relay chain on loopback."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.lab", "tests.helpers")

from tests.helpers import *  # noqa: E402,F403
from tests.lab.fixtures import *  # noqa: E402,F403

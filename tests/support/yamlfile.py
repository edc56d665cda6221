"""Read the deploy assets' YAML files (Prometheus rules, COBalD/TARDIS configs) in tests.

The project has no YAML dependency; Debian's python3-yaml (installed by scripts/install-debs)
parses them in the system interpreter and hands JSON back. Custom tags (``!SSHExecutor``)
come back as ``{"!SSHExecutor": value}``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"

_TO_JSON = r"""
import json, sys, yaml

class Loader(yaml.SafeLoader):
    pass

def tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"!" + suffix: value}

Loader.add_multi_constructor("!", tagged)
with open(sys.argv[1]) as fh:
    print(json.dumps(yaml.load(fh, Loader=Loader)))
"""


def load_yaml(path: Path) -> Any:
    """The document in ``path`` as plain Python data; fails (never skips) without python3-yaml."""
    try:
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", _TO_JSON, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        pytest.fail(f"{SYSTEM_PYTHON} missing: run scripts/install-debs", pytrace=False)
    if out.returncode != 0:
        if "No module named 'yaml'" in out.stderr:
            pytest.fail("python3-yaml missing: run scripts/install-debs", pytrace=False)
        pytest.fail(f"{path} is not valid YAML:\n{out.stderr}", pytrace=False)
    return json.loads(out.stdout)

"""``python -m glidein_wrapper``: the same as the ``glidein-wrapper`` command."""

from __future__ import annotations

import sys

from glidein_wrapper.main import main

sys.exit(main())

"""The private per-run directory: credentials and generated config files, mode 0700/0600.

Other users may share a compute node, and the files hold the local relay password, so the
directory is created fresh (``mkdtemp``: 0700, a name nobody can predict) and every file in
it is created exclusively with mode 0600. The directory is removed when the wrapper exits.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Optional

USER = "glidein"


def make_run_dir(parent: Optional[Path] = None) -> Path:
    """A fresh private directory under ``parent`` (default ``$TMPDIR`` or ``/tmp``)."""
    path = Path(tempfile.mkdtemp(prefix="glidein-wrapper.", dir=parent))
    path.chmod(0o700)
    return path


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_private(path: Path, text: str) -> Path:
    """Create ``path`` with mode 0600 (refusing to follow or reuse an existing file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def new_credentials() -> tuple[str, str]:
    """A user name and a fresh random password for this run's local listeners.

    The password is URL- and proxychains-safe (letters, digits, '-', '_'): it goes into
    ``socks5h://user:password@...`` and into a proxychains config line split on blanks.
    """
    return USER, secrets.token_urlsafe(24)

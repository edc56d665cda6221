"""Reading secret files safely.

Every reader opens the file once, checks on that open descriptor that it is a
private regular file (so a swap between check and read cannot fool it), and
only then reads.  Error messages name the flag, the file and a line number but
never echo file contents: a malformed line may well be a secret pasted in the
wrong place.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from relay.errors import ConfigError

__all__ = [
    "KEY_ID_RE",
    "MIN_SECRET_BYTES",
    "check_private",
    "load_keys",
    "load_secret",
    "load_userpass",
]

#: Shared secrets shorter than this are guessable; both ends enforce it.
MIN_SECRET_BYTES = 16
#: Key ids travel in the handshake and in logs, so they are kept to a safe alphabet.
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: RFC 1929 encodes user name and password lengths in one byte each.
_RFC1929_MAX = 255


def _mode_problem(path: Path, mode: int, what: str) -> ConfigError | None:
    """Explain why a file with this st_mode must not hold a secret, or None if it may."""
    if not stat.S_ISREG(mode):
        return ConfigError(f"{what}: {path} is not a regular file")
    loose = mode & 0o077
    if loose == 0:
        return None
    who = "others" if loose & 0o007 else "group"
    if loose & 0o044:
        how = "readable"
    elif loose & 0o022:
        how = "writable"
    else:
        how = "accessible"
    return ConfigError(f"{what}: {path} is {how} by {who} (chmod 600 {path})")


def _os_error(path: Path, what: str, exc: OSError) -> ConfigError:
    """Turn an OSError into a one-line ConfigError naming the flag and the file."""
    reason = exc.strerror or exc.__class__.__name__
    return ConfigError(f"{what}: cannot read {path}: {reason}")


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that is not a regular file or that group/others can touch.

    Secrets readable by other users of a shared HPC node are as good as public.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(path, what, exc) from None
    problem = _mode_problem(path, st.st_mode, what)
    if problem is not None:
        raise problem


def _read_private(path: Path, what: str) -> bytes:
    """Open, check privacy on the open descriptor, then read the whole file.

    O_NONBLOCK keeps a FIFO planted at the path from hanging the daemon at start.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_error(path, what, exc) from None
    try:
        st = os.fstat(fd)
        problem = _mode_problem(path, st.st_mode, what)
        if problem is not None:
            raise problem
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise _os_error(path, what, exc) from None
    finally:
        os.close(fd)


def _decode(data: bytes, path: Path, what: str) -> str:
    """Decode UTF-8, reporting only the line of a bad byte, never the bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what}: {path} line {line}: not valid UTF-8") from None


def load_keys(path: Path, what: str = "--keys") -> dict[str, bytes]:
    """Read the exit's key file: lines ``KEY_ID SECRET``, '#' comments, blank lines.

    A token after the secret is allowed only as a '#' comment, so a stray third
    word is reported instead of silently ignored.
    """
    text = _decode(_read_private(path, what), path, what)
    keys: dict[str, bytes] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        where = f"{what}: {path} line {lineno}"
        if len(tokens) < 2 or (len(tokens) > 2 and not tokens[2].startswith("#")):
            raise ConfigError(f"{where}: expected 'KEY_ID SECRET'")
        key_id, secret_text = tokens[0], tokens[1]
        if not KEY_ID_RE.fullmatch(key_id):
            raise ConfigError(f"{where}: key id must be 1-64 characters from A-Z a-z 0-9 . _ -")
        secret = secret_text.encode("utf-8")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"{where}: secret is shorter than {MIN_SECRET_BYTES} bytes (got {len(secret)})"
            )
        _check_characters(secret, where)
        if key_id in keys:
            raise ConfigError(
                f"{where}: duplicate key id {key_id!r} (first on line {first_line[key_id]})"
            )
        keys[key_id] = secret
        first_line[key_id] = lineno
    if not keys:
        raise ConfigError(f"{what}: {path} holds no 'KEY_ID SECRET' line")
    return keys


def load_secret(path: Path, what: str = "--secret-file") -> bytes:
    """Read the worker's shared secret: the whole file, surrounding whitespace stripped.

    Whitespace inside is refused: the exit's key file splits on it, so such a
    secret could never match (a pasted ``KEY_ID SECRET`` line is the usual cause).
    """
    secret = _read_private(path, what).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what}: {path}: secret is shorter than {MIN_SECRET_BYTES} bytes (got {len(secret)})"
        )
    if len(secret.split()) != 1:
        raise ConfigError(
            f"{what}: {path}: secret contains whitespace (the file must hold the secret only,"
            " not 'KEY_ID SECRET')"
        )
    _check_characters(secret, f"{what}: {path}")
    return secret


def _check_characters(secret: bytes, where: str) -> None:
    """Refuse control characters: HMAC pads a key with NUL bytes, so secrets differing
    only in trailing NULs would be one key, and no editor shows the difference."""
    for byte in secret:
        if byte < 0x20 or byte == 0x7F:
            raise ConfigError(f"{where}: secret contains a control character (byte {byte:#04x})")


def load_userpass(path: Path, what: str = "--socks-auth") -> tuple[str, str]:
    """Read one ``USER:PASSWORD`` line for RFC 1929 (each part 1..255 bytes of UTF-8).

    Only the line ending is stripped: spaces may be part of a password.  The user
    ends at the first ':' so passwords may contain ':'.
    """
    text = _decode(_read_private(path, what), path, what).rstrip("\r\n")
    if not text:
        raise ConfigError(f"{what}: {path} is empty (expected one line USER:PASSWORD)")
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what}: {path} must hold exactly one line USER:PASSWORD")
    user, sep, password = text.partition(":")
    if not sep:
        raise ConfigError(f"{what}: {path}: expected USER:PASSWORD (no ':' found)")
    for name, value in (("user", user), ("password", password)):
        size = len(value.encode("utf-8"))
        if not 1 <= size <= _RFC1929_MAX:
            raise ConfigError(
                f"{what}: {path}: {name} must be 1..{_RFC1929_MAX} bytes (got {size})"
            )
    return user, password

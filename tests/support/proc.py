"""Process helpers that end exactly the processes a test started, by pid.

Tests share the machine with other engineers' runs, so nothing here ever matches processes by
name: callers hand in the pids (or Popen objects) they own, plus their descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the comm field, or None when the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: cut at the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie (a zombie no longer holds any resource)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (children first), e.g. sshd's per-connection processes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def terminate(
    pids: Iterable[int] = (),
    popens: Iterable[subprocess.Popen[bytes] | subprocess.Popen[str]] = (),
    timeout: float = 5.0,
) -> None:
    """SIGTERM the given processes, wait up to timeout, then SIGKILL what is left.

    Popen objects are reaped through the Popen so no zombie or ResourceWarning remains; bare pids
    (processes that are not our children, e.g. sshd session processes) are polled via /proc.
    """
    procs = [p for p in popens if p.poll() is None]
    bare = [p for p in dict.fromkeys(pids) if p not in {q.pid for q in procs} and pid_alive(p)]
    for proc in procs:
        _signal(proc.pid, signal.SIGTERM)
    for pid in bare:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [p for p in procs if p.poll() is None]
        bare = [p for p in bare if pid_alive(p)]
        if not procs and not bare:
            return
        time.sleep(0.05)
    for proc in procs:
        _signal(proc.pid, signal.SIGKILL)
    for pid in bare:
        _signal(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    end = time.monotonic() + 5
    while any(pid_alive(p) for p in bare) and time.monotonic() < end:
        time.sleep(0.05)

"""CPU time and memory of process trees, read from /proc.

A chain is a set of root pids (ssh client, sshd listener, danted, relay-worker, relay-exit, ...);
each root counts with all its descendants, so sshd's per-connection children and dante's
forked helpers are included. CPU is utime + stime + cutime + cstime summed over the live tree:
the time of a child that exits and is reaped moves into its parent's cutime/cstime, so the sum
stays right across forks and exits between two samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields after comm of /proc/PID/stat (index 0 = state), or None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree(roots: Iterable[int]) -> list[int]:
    """The roots and all their live descendants (one /proc scan)."""
    children = _children_map()
    out: list[int] = []
    todo = [r for r in roots if _stat(r) is not None]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime of the given pids (no descendants added)."""
    ticks = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            # after comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def tree_cpu(roots: Iterable[int]) -> float:
    return cpu_seconds(tree(roots))


def memory(pids: Iterable[int]) -> dict[str, int]:
    """Summed Rss and Pss in bytes (from smaps_rollup) and the process count."""
    rss = pss = count = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        count += 1
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return {"rss": rss, "pss": pss, "processes": count}


def tree_memory(roots: Iterable[int]) -> dict[str, int]:
    return memory(tree(roots))

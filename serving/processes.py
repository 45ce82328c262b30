"""Process bookkeeping for the launcher (Linux ``/proc``): is a pid still our server, which processes did it start,
and stopping all of them, so ``serve stop`` leaves no python-backend stub behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Clock ticks after boot at which the process started: with the pid, it names one process for good."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our exited child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int, started: int | None = None) -> bool:
    """Alive (zombies count as gone), and the same process as the one that started at ``started``."""
    reap(pid)
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def family(pid: int) -> set[int]:
    """``pid``'s descendants and the members of its process group (the server runs in a session of its own)."""
    parents: dict[int, int] = {}
    group: set[int] = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is None:
            continue
        parents[int(entry.name)] = int(fields[1])
        if int(fields[2]) == pid:
            group.add(int(entry.name))
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return (found | group) - {pid}


def orphans(pid: int) -> set[int]:
    """What a dead process-group leader ``pid`` left running: its group's members (a server killed by SIGKILL or
    the OOM killer leaves its stubs behind). Empty while ``pid`` runs: Linux gives out no pid that still names a
    process group, so a live ``pid`` is either the leader itself or a new process whose old group is empty."""
    fields = stat_fields(pid)
    return family(pid) if fields is None or fields[0] in ("Z", "X") else set()


def command_line(pid: int) -> list[str]:
    """The arguments ``pid`` was started with (empty when it is gone)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` runs; returns those still running at the timeout."""
    deadline = time.monotonic() + timeout
    alive = {p for p in pids if is_running(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {p for p in alive if is_running(p)}
    return alive


def stop_tree(pid: int, timeout: float) -> set[int]:
    """SIGTERM the server (it unloads its models and stops its stubs), wait up to ``timeout``, then SIGKILL
    whatever of it and its family is left. Returns the pids that still ran after SIGKILL (normally none)."""
    members = family(pid)
    signal_all({pid}, signal.SIGTERM)
    wait_gone({pid}, timeout)
    members |= family(pid)
    leftover = wait_gone(members | {pid}, 1.0)
    if leftover:
        signal_all(leftover, signal.SIGKILL)
        leftover = wait_gone(leftover, 5.0)
    return leftover

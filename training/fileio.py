"""Atomic file writes: a temporary file beside the target, renamed over it, so a reader (or a resumed run)
never sees a half-written file, even if the process is killed mid-write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``. The data is flushed to
    disk before the rename, and the folder after it, so a crash or power cut leaves the old file or the new one,
    never an empty one (without the flush, the rename can reach the disk before the data it points to)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _sync(tmp, os.O_RDWR)  # Windows syncs only descriptors open for writing
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # the folder's entry holds the rename; Windows cannot open a folder to sync it
        _sync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _sync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that a writer killed mid-write left behind (SIGKILL skips the cleanup
    above); only for a file no other process is writing."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

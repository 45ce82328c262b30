"""Which ``tritonserver`` to run, and the environment it needs.

Preference: ``--tritonserver PATH``; else a ``tritonserver`` on PATH (a full install, e.g. a Triton container, with
its own backends); else the binary bundled in the ``nvidia-pytriton`` wheel. The bundled one has only the python
backend and needs three things: a backend directory holding ``libtriton_python.so`` beside the stub
for this Python version (built here in a cache folder, symlinks only; site-packages is never modified), this
Python's own ``libpython`` first on LD_LIBRARY_PATH (not the system's), and the venv's ``bin/`` first on PATH.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

STUB = "triton_python_backend_stub"
# tritonserver 2.51 has no option bounding a gRPC message (up to 2 GB are accepted; preprocess refuses an image over
# 20 MB only once it is received). Two things kept such messages' memory: its pool of request objects (each keeps
# its largest message for reuse; the launcher turns it off) and glibc's sliding mmap threshold, which moves large
# buffers onto the heap, where they stay; a fixed threshold keeps them in mappings returned when freed. Measured with
# 12 oversized 30 MB requests: the server's RSS grew from 38 to 218 MB by default, to 81 MB (after the first, then
# flat) with both (the rest is the python backend's region that carried the image); either one alone still grew.
MMAP_THRESHOLD_BYTES = 1024 * 1024
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
# The python backend starts each stub through a shell command line that it does not quote: a path with a space
# splits into two arguments (the stub dies with `stol`), shell syntax would run, non-ASCII fails to encode.
BACKEND_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@=,:~-]+")


@dataclass(frozen=True)
class ServerBinary:
    """A tritonserver executable, the backend directory to pass it (None: its own) and libraries it needs."""

    path: Path
    backend_dir: Path | None
    library_dirs: tuple[Path, ...]


def pytriton_root() -> Path | None:
    """``pytriton/tritonserver`` of the installed wheel, found without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "freesolo" / "triton_backends"


def python_backend_dir(root: Path, cache: Path) -> Path:
    """A backend directory whose ``python/`` links the bundled backend and this Python's stub (built once)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        raise UserError(f"the bundled tritonserver has no python backend stub for Python {version} ({stub})")
    sources = {name: root / "backends" / "python" / name for name in BACKEND_FILES} | {STUB: stub}
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    target = cache / f"py{version}-{key}"
    if all((target / "python" / name).resolve() == source.resolve() for name, source in sources.items()):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    (staging / "python").mkdir()
    for name, source in sources.items():
        (staging / "python" / name).symlink_to(source.resolve())
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another start built it at the same moment
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_backend_path(path: Path, what: str) -> None:
    """UserError unless the python backend can start its stubs from ``path`` (see BACKEND_SAFE_PATH)."""
    text = str(path)
    if not BACKEND_SAFE_PATH.fullmatch(text):
        odd = sorted({c for c in text if not BACKEND_SAFE_PATH.fullmatch(c)})
        raise UserError(
            f"{what} {text!r} holds {''.join(odd)!r}: Triton's python backend cannot start models from a path with "
            "spaces, non-ASCII or shell characters; use a path of letters, digits and ._/+@=,:~- only"
        )


def find_server(explicit: Path | None = None) -> ServerBinary:
    """The tritonserver to run (see the module docstring for the order)."""
    if explicit is not None:
        if not (explicit.is_file() and os.access(explicit, os.X_OK)):
            raise UserError(f"--tritonserver {explicit} is not an executable file")
        return ServerBinary(explicit, None, ())
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), None, ())
    root = pytriton_root()
    if root is None:
        raise UserError("no tritonserver found: install nvidia-pytriton (pip) or put tritonserver on PATH")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    backend_dir = python_backend_dir(root, cache_dir())
    check_backend_path(backend_dir, "the python backend folder (under XDG_CACHE_HOME)")
    return ServerBinary(root / "bin" / "tritonserver", backend_dir, (libs,))


def server_environment(binary: ServerBinary, plugin_lib: Path | None = None) -> dict[str, str]:
    """The server's environment: this Python's libpython first, the venv's bin first, a fixed mmap threshold (unless
    set already), an optional preload."""
    env = dict(os.environ)
    libraries = [str(Path(sys.base_prefix) / "lib"), *(str(d) for d in binary.library_dirs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    if plugin_lib is not None:
        if not plugin_lib.is_file():
            raise UserError(f"--plugin-lib {plugin_lib} not found")
        env["LD_PRELOAD"] = " ".join(filter(None, [str(plugin_lib.resolve()), env.get("LD_PRELOAD")]))
    return env

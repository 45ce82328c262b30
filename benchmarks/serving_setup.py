"""What the serving benchmarks share: the images a client sends, an exported model, and a tritonserver on free
loopback ports that is always stopped again.

Exports are cached under ``runs/bench/cache/onnx`` keyed by preset (or checkpoint content), size and a fingerprint
of the sources that build the graph: an export takes 25-100 s on 2 cores, longer than most measurements it serves.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import skimage.data
from PIL import Image

from serving.launcher import Ports, ServerState, loopback_ports, start_server, stop_server
from serving.repository import Settings, prepare_repository
from training.cli import main as freesolo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
EXPORT_CACHE = Path("runs/bench/cache/onnx")
PROJECT = Path(__file__).resolve().parent.parent
GRAPH_SOURCES = ("export", "training/models", "training/ops", "training/config.py")  # what an export's graph depends on


def photographs() -> dict[str, bytes]:
    """skimage's photographs as JPEG (quality 90), what a client would typically send."""
    encoded = {}
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buffer, "JPEG", quality=90)
        encoded[name] = buffer.getvalue()
    return encoded


def free_ports() -> Ports:
    """HTTP, gRPC and metrics ports the OS has just handed out on loopback."""
    return Ports(*loopback_ports(3))


def export_model(
    folder: Path,
    checkpoint: Path | None = None,
    preset: str = "tiny",
    height: int | None = None,
    width: int | None = None,
) -> Path:
    """``freesolo export onnx`` of ``checkpoint``, else of the preset's random weights, into ``folder``."""
    out = folder / "model.onnx"
    source = ["--checkpoint", str(checkpoint)] if checkpoint else ["--preset", preset]
    size = ["--height", str(height), "--width", str(width)] if height and width else []
    if freesolo(["export", "onnx", *source, *size, "--out", str(out)]) != 0:
        raise SystemExit("export failed")
    return out


def graph_fingerprint(root: Path = PROJECT) -> str:
    """A hash of the sources an exported graph depends on: a cached export is reused only while they are unchanged."""
    digest = hashlib.sha256()
    for name in GRAPH_SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def cached_export(
    preset: str, height: int, width: int, checkpoint: Path | None = None, cache: Path = EXPORT_CACHE
) -> Path:
    """``checkpoint`` (else the preset's random weights) exported at ``height`` x ``width``, made once per graph
    fingerprint (and checkpoint content)."""
    source = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12] if checkpoint else preset
    target = cache / f"{source}_{height}x{width}_{graph_fingerprint()}.onnx"
    if not target.is_file():
        staging = cache / f".staging-{target.stem}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        export_model(staging, checkpoint, preset, height, width).rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def serving(onnx_path: Path, repo: Path, settings: Settings, timeout: float = 120.0) -> Iterator[ServerState]:
    """``serve prepare`` + ``serve start`` on free loopback ports (ready within ``timeout`` s); the server is stopped
    on the way out."""
    prepare_repository(onnx_path, repo, settings)
    state = start_server(repo, ports=free_ports(), timeout=timeout, log=progress)
    try:
        yield state
    finally:
        stop_server(repo)

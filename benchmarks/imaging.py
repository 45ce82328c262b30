"""Decode and test-resize of a large photograph: the project's one decoder and resize against Pillow's, side by side.

A served 40-megapixel JPEG is legal (``serving.contract``: up to 40 megapixels, 20 MB), and its preprocessing is CPU
time taken from every other request. This part times what the server's preprocess does with one
(``serving.imaging.decode_image``, then ``training.geometry.resize_rgb`` to the default test size) against Pillow
doing the same work in C (``Image.open(...).convert("RGB")``, then ``Image.resize`` with its antialiased bilinear
filter, whose pixels differ from torch's by a level in a few percent of them). It also times Pillow decoding at a
reduced size first (``Image.draft``: JPEG's DCT scaling), which the project does not do: what it would save.

The image is generated (a photograph upscaled to 7296 x 5472 = 39.9 megapixels, JPEG quality 90). The three ways
take turns (``benchmarks.latency.interleaved_timings``), so load from other processes hits them alike; each reports
its median ms and the ratio to Pillow's decode + resize. numpy's matrix products use its BLAS's default threads
(as the server does); Pillow's decoder and resize use one.

Quick mode (tests, CI): a 1632 x 1224 (2-megapixel) image, 3 runs each.

    .venv/bin/python -m benchmarks.imaging --out runs/bench/imaging
"""

from __future__ import annotations

import io
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from benchmarks.latency import interleaved_timings
from benchmarks.reporting import cpu_flags, machine, part_parser, utc_now, write_report
from serving.imaging import decode_image
from training.config import InputConfig
from training.geometry import resize_rgb, resized_shape

STEM = "imaging"
FULL_SIZE, FULL_RUNS = (5472, 7296), 6  # height, width: 39.9 megapixels, under the server's 40-megapixel limit
QUICK_SIZE, QUICK_RUNS = (1224, 1632), 3
JPEG_QUALITY = 90


def photograph_jpeg(height: int, width: int) -> bytes:
    """A photograph (skimage's astronaut) upscaled to ``height`` x ``width``, as JPEG bytes."""
    picture = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def project(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """What the server's preprocess does before padding: the one decoder, then the one resize."""
    return resize_rgb(decode_image(data), size)


def pillow(data: bytes, size: tuple[int, int], draft: bool = False) -> np.ndarray:
    """Pillow's decode and antialiased bilinear resize; with ``draft``, JPEG decoded at a reduced size first."""
    with Image.open(io.BytesIO(data)) as image:
        if draft:
            image.draft("RGB", (size[1], size[0]))
        return np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    height, width = QUICK_SIZE if quick else FULL_SIZE
    runs = QUICK_RUNS if quick else FULL_RUNS
    defaults = InputConfig()
    size = resized_shape(height, width, defaults.test_size, defaults.max_size)
    data = photograph_jpeg(height, width)
    decoded = decode_image(data)
    functions = {
        "project": lambda: project(data, size),
        "pillow": lambda: pillow(data, size),
        "pillow_draft": lambda: pillow(data, size, draft=True),
        "project_decode_only": lambda: decode_image(data),
        "project_resize_only": lambda: resize_rgb(decoded, size),
    }
    samples = interleaved_timings(functions, runs, warmup=1)
    medians = {name: round(statistics.median(times), 1) for name, times in samples.items()}
    difference = np.abs(project(data, size).astype(int) - pillow(data, size).astype(int))
    report = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": utc_now(),
        "quick": quick,
        "load_average": round(os.getloadavg()[0], 2),
        "image": {"height": height, "width": width, "megapixels": round(height * width / 1e6, 1), "bytes": len(data)},
        "resized_to": list(size),
        "runs": runs,
        "median_ms": medians,
        "ratio_to_pillow": {name: round(medians[name] / medians["pillow"], 2) for name in ("project", "pillow_draft")},
        "pixels_differing_from_pillow": round(float((difference > 0).mean()), 4),
        "max_difference_from_pillow": int(difference.max()),
    }
    write_report(out, STEM, report, markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    image, medians, ratios = report["image"], report["median_ms"], report["ratio_to_pillow"]
    height, width = report["resized_to"]
    return "\n".join(
        [
            "# Decode and resize of a large JPEG: the project's against Pillow's",
            "",
            f"{report['machine']} (flags: {' '.join(report['cpu_flags']) or 'unknown'}); {report['date']}; "
            f"load average {report['load_average']}; {'quick form' if report['quick'] else 'full form'}.",
            "",
            f"A generated {image['width']} x {image['height']} JPEG ({image['megapixels']} megapixels, "
            f"{image['bytes'] / 1e6:.1f} MB), decoded to RGB and resized to {width} x {height} (the default test "
            f"size); median of {report['runs']} runs each, taking turns.",
            "",
            "| way | median ms | vs Pillow |",
            "|---|---|---|",
            "| project: `decode_image` + `resize_rgb` (what the server's preprocess does) | "
            f"{medians['project']:.0f} | {ratios['project']:.2f}x |",
            f"| Pillow: `convert('RGB')` + `resize(BILINEAR)` | {medians['pillow']:.0f} | 1.00x |",
            f"| Pillow with `draft` (JPEG decoded at reduced size; not used by the project) | "
            f"{medians['pillow_draft']:.0f} | {ratios['pillow_draft']:.2f}x |",
            f"| project, decode only | {medians['project_decode_only']:.0f} | |",
            f"| project, resize only | {medians['project_resize_only']:.0f} | |",
            "",
            f"The project's pixels differ from Pillow's in {100 * report['pixels_differing_from_pillow']:.1f} % of "
            f"them, by at most {report['max_difference_from_pillow']} level(s): Pillow rounds to 8 bits between its "
            "two passes; the project keeps float32 throughout, as torch does, and every runtime uses it.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__ or "", Path("runs/bench/imaging"), "a 2-megapixel image, 3 runs")
    args = parser.parse_args(argv)
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

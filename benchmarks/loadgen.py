"""A load generator for the served ``freesolo`` ensemble over gRPC: the project's perf_analyzer (which cannot be
installed here), built on ``AsyncFreeSOLOClient``.

``concurrency`` asyncio workers, each with a client of its own (its own channel and, with shared memory, its own
region), send requests of ``batch`` images back to back, the images cycled from a list, for ``duration_s`` seconds or
until ``requests`` requests have been sent. Every worker first sends ``warmup`` untimed requests (connection, model
config, shared-memory registration). No retries: every failure counts, grouped by its kind (gRPC status and the
server's words) with the client's full message of the first one. The first answer for each image is kept and every
later answer compared with it, so answers that differ under load (crossed requests, a region overwritten too early)
show up as ``mismatches``.

    python -m benchmarks.loadgen --url 127.0.0.1:8001 photo.jpg scene.png --concurrency 1,2,4,8 --duration 10 \\
        --shared-memory off,on --out runs/load
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.reporting import latency_summary, machine, utc_now, write_report
from serving.client import AsyncFreeSOLOClient, Detection, ImageInputError, ServingError
from serving.client_images import encode_image
from serving.contract import ENSEMBLE
from training.data.images import expand_images
from training.errors import UserError

MODES = {"off": False, "on": True}


@dataclass(frozen=True)
class LoadSpec:
    """One load point. Exactly one of ``duration_s`` and ``requests`` bounds it."""

    url: str
    images: Sequence[bytes]
    concurrency: int = 1
    duration_s: float | None = None
    requests: int | None = None
    shared_memory: bool = False
    timeout_s: float = 30.0
    batch: int = 1
    model: str = ENSEMBLE
    warmup: int = 1

    def __post_init__(self) -> None:
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give either duration_s or requests")
        if self.concurrency < 1 or self.batch < 1 or self.warmup < 0 or not self.images:
            raise ValueError("concurrency and batch must be >= 1, warmup >= 0, and images not empty")


@dataclass
class ErrorKind:
    count: int
    first: str  # the client's full message of the first failure of this kind
    first_at_s: float  # when it ended, seconds after the measured window opened


@dataclass
class LoadResult:
    concurrency: int
    shared_memory: bool
    batch: int
    ok: int  # requests answered
    images_per_s: float  # images answered per second of the window
    window_s: float  # from the first measured request to the end of the last
    latency: dict[str, float]  # of answered requests (benchmarks.reporting.latency_summary)
    error_latency: dict[str, float]  # of failed requests (and their max_ms): how long a failure took to come
    errors: dict[str, ErrorKind]
    mismatches: int  # answers that differ from the first answer for the same image
    answers: dict[int, list[Detection]] = field(repr=False)  # first answer per image index

    @property
    def error_count(self) -> int:
        return sum(kind.count for kind in self.errors.values())

    def row(self) -> dict[str, Any]:
        """The json-able summary (without the answers)."""
        summary = asdict(self)
        del summary["answers"]
        return {**summary, "error_count": self.error_count}


def error_kind(error: ServingError | ImageInputError) -> str:
    """Failures of one kind share this key: the gRPC status and the server's own words."""
    if isinstance(error, ImageInputError):
        return f"client: {error.reason}"
    return f"{error.status or 'client'}: {error.server_message or error}"


class Load:
    """One load point; ``ok`` counts answers as they come, so another task can act mid-load."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.ok = 0
        self.started = 0.0  # perf_counter when the measured window opened
        self._next_image = itertools.count()
        self._issued = 0
        self._latencies: list[float] = []
        self._error_latencies: list[float] = []
        self._errors: dict[str, ErrorKind] = {}
        self._answers: dict[int, list[Detection]] = {}
        self._mismatches = 0

    def _more(self, deadline: float) -> bool:
        """Whether a worker sends another measured request (and claims it in request-count mode)."""
        if self.spec.requests is None:
            return time.perf_counter() < deadline
        if self._issued >= self.spec.requests:
            return False
        self._issued += 1
        return True

    async def _request(self, client: AsyncFreeSOLOClient, measured: bool) -> None:
        indices = [next(self._next_image) % len(self.spec.images) for _ in range(self.spec.batch)]
        sent = time.perf_counter()
        try:
            answers = await client.predict([self.spec.images[i] for i in indices])
        except (ServingError, ImageInputError) as error:
            if measured:
                ended = time.perf_counter()
                self._error_latencies.append(1000 * (ended - sent))
                kind = self._errors.setdefault(error_kind(error), ErrorKind(0, str(error), ended - self.started))
                kind.count += 1
            return
        if not measured:
            return
        self._latencies.append(1000 * (time.perf_counter() - sent))
        self.ok += 1
        for index, answer in zip(indices, answers, strict=True):
            first = self._answers.setdefault(index, answer)
            self._mismatches += first != answer

    async def _warm(self, client: AsyncFreeSOLOClient) -> None:
        for _ in range(self.spec.warmup):
            await self._request(client, measured=False)

    async def _work(self, client: AsyncFreeSOLOClient, deadline: float) -> None:
        while self._more(deadline):
            await self._request(client, measured=True)

    async def run(self) -> LoadResult:
        spec = self.spec
        clients = [
            AsyncFreeSOLOClient(
                spec.url, spec.model, timeout_s=spec.timeout_s, retries=0, use_shared_memory=spec.shared_memory
            )
            for _ in range(spec.concurrency)
        ]
        try:
            await asyncio.gather(*(self._warm(client) for client in clients))
            self.started = time.perf_counter()
            deadline = self.started + (spec.duration_s or 0.0)
            await asyncio.gather(*(self._work(client, deadline) for client in clients))
            window = time.perf_counter() - self.started
        finally:
            for client in clients:
                await client.close()
        return LoadResult(
            spec.concurrency,
            spec.shared_memory,
            spec.batch,
            self.ok,
            round(self.ok * spec.batch / window, 2) if window > 0 else 0.0,
            round(window, 3),
            latency_summary(self._latencies),
            {**latency_summary(self._error_latencies), "max_ms": round(max(self._error_latencies, default=0.0), 3)},
            self._errors,
            self._mismatches,
            self._answers,
        )


def generate(spec: LoadSpec) -> LoadResult:
    """Run one load point in a fresh event loop."""
    return asyncio.run(Load(spec).run())


def sweep(
    spec: LoadSpec,
    concurrencies: Sequence[int],
    shared_memory: Sequence[bool] = (False,),
    report: Callable[[LoadResult], None] | None = None,
) -> list[LoadResult]:
    """One point per concurrency and shared-memory mode (modes interleaved, so drifting load from other processes
    hits them alike); ``report(result)`` is called after each point."""
    results = []
    for concurrency in concurrencies:
        for shm in shared_memory:
            result = generate(replace(spec, concurrency=concurrency, shared_memory=shm))
            if report is not None:
                report(result)
            results.append(result)
    return results


def progress_line(result: LoadResult) -> str:
    return (
        f"concurrency {result.concurrency}, shared memory {'on' if result.shared_memory else 'off'}: "
        f"{result.ok} ok, {result.error_count} errors, {result.images_per_s:.1f} images/s, "
        f"p50 {result.latency['p50_ms']:.1f} ms, p99 {result.latency['p99_ms']:.1f} ms"
    )


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown rows of points (``LoadResult.row()``), then each kind of error seen with its first message."""
    lines = [
        "| concurrency | shared memory | ok | errors | mismatches | images/s | p50 ms | p90 ms | p99 ms | window s |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = r["latency"]
        lines.append(
            f"| {r['concurrency']} | {'on' if r['shared_memory'] else 'off'} | {r['ok']} | {r['error_count']} | "
            f"{r['mismatches']} | {r['images_per_s']:.1f} | {latency['p50_ms']:.1f} | {latency['p90_ms']:.1f} | "
            f"{latency['p99_ms']:.1f} | {r['window_s']:.1f} |"
        )
    kinds = {kind: error["first"] for r in rows for kind, error in r["errors"].items()}
    if kinds:
        lines += ["", "Errors (kind: count over all points; the first message of the kind):", ""]
        for kind, first in kinds.items():
            count = sum(r["errors"][kind]["count"] for r in rows if kind in r["errors"])
            lines.append(f"- `{kind}`: {count}; first: {first}")
    return lines


def csv_of(text: str, cast: Callable[[str], Any], name: str) -> list[Any]:
    try:
        values = [cast(item.strip()) for item in text.split(",") if item.strip()]
    except (KeyError, ValueError):
        raise SystemExit(f"{name}: a comma-separated list, got {text!r}") from None
    if not values:
        raise SystemExit(f"{name}: give at least one value")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Load-test the served freesolo ensemble over gRPC (a perf_analyzer for this project): "
        "concurrent clients send images back to back; latency percentiles, images/s and errors per point. Exit "
        "code 1 when any request failed.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders, cycled")
    parser.add_argument("--url", default="127.0.0.1:8001", metavar="HOST:PORT", help="the server's gRPC endpoint")
    parser.add_argument("--model", default=ENSEMBLE, help=f"model to request ({ENSEMBLE})")
    parser.add_argument("--concurrency", default="1,2,4,8", metavar="N,...", help="concurrent clients (1,2,4,8)")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, metavar="S", help="seconds per point (default 10)")
    bound.add_argument("--requests", type=int, metavar="N", help="requests per point instead of a duration")
    parser.add_argument("--shared-memory", default="off", metavar="off,on", help="system shared memory (off)")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="images per request (1)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds per request (30)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed requests per client first (1)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write DIR/loadgen.json and DIR/loadgen.md")
    args = parser.parse_args(argv)
    args.concurrency = csv_of(args.concurrency, int, "--concurrency")
    args.shared_memory = csv_of(args.shared_memory, lambda text: MODES[text], "--shared-memory")
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = expand_images(args.images)
        images = [encode_image(file, index) for index, file in enumerate(files)]
        spec = LoadSpec(
            args.url, images, 1, args.duration, args.requests, False, args.timeout, args.batch, args.model, args.warmup
        )
    except (UserError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    bound = f"{args.duration:g} s" if args.duration is not None else f"{args.requests} requests"
    print(
        f"{args.url}, model {args.model}: {len(images)} images, batch {args.batch}, {bound} per point", file=sys.stderr
    )
    load_average = os.getloadavg()[0]
    results = sweep(spec, args.concurrency, args.shared_memory, lambda r: print(progress_line(r), file=sys.stderr))
    header = [
        f"# Load test of `{args.model}` at {args.url}",
        "",
        f"{machine()}; {utc_now()}. {len(images)} images cycled, {args.batch} per request, {bound} per point, "
        f"timeout {args.timeout:g} s, {args.warmup} warm-up request(s) per client. 1-minute load average "
        f"{load_average:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
    ]
    rows = [r.row() for r in results]
    text = "\n".join(header + table(rows)) + "\n"
    if args.out is None:
        print(text)
    else:
        report = {"url": args.url, "model": args.model, "images": [str(f) for f in files], "bound": bound}
        write_report(args.out, "loadgen", {**report, "points": rows}, text)
    return 1 if any(r.error_count for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

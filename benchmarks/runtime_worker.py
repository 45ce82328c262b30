"""One runtime in a process of its own, driven over a pipe: so that the peak memory a runtime reports is its own, not
that of the process that also exported, compared and served the model. The real-size benchmark times its runtimes
through these workers, taking turns call by call.

A worker is a fresh interpreter (``python -m benchmarks.runtime_worker FD``, talking over a socket pair; not
multiprocessing's ``spawn``, which would import the parent's main module into it) and imports only what its runtime
needs: an ONNX Runtime worker never imports torch, which alone adds about 0.5 GB. Memory is the kernel's
high-water mark of the process's resident set (``peak_rss_mb``): the baseline is read after the runtime's imports and
before its model is loaded, the peak when the worker ends, so the peak covers loading and every call, batch 4 included.

A ``pytorch_fp32`` worker first times its model in both memory layouts (contiguous NCHW and channels_last, one untimed
and one timed batch-1 call each) and keeps the faster one; the report says which.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("pytorch_fp32", "pytorch_bf16", "ort_fp32", "ort_int8")
Call = Callable[[], list[int]]  # one run of the runtime on one prepared batch -> detections per image


@dataclass(frozen=True)
class RuntimeSpec:
    """Which runtime, on which file: a checkpoint for ``pytorch_*``, an ONNX model for ``ort_*``."""

    name: str
    model: Path
    threads: int


def peak_rss_mb() -> float:
    """The process's peak resident set so far, MiB: ``VmHWM`` of /proc/self/status (Linux), the high-water mark of
    this process image's memory. Not ``ru_maxrss``: Linux carries it over a fork and exec, so a spawned worker would
    report its parent's size. Elsewhere ``ru_maxrss`` is the best there is (KiB on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1 << 20) if sys.platform == "darwin" else maxrss / 1024


def ort_calls(spec: RuntimeSpec, inputs: dict[int, np.ndarray]) -> tuple[dict[int, Call], dict[str, Any]]:
    from export.onnx_inputs import OnnxModel, session_options

    baseline = peak_rss_mb()
    model = OnnxModel(spec.model, session_options(spec.threads))
    calls = {batch: (lambda x=x: model.run(x)["num_dets"].tolist()) for batch, x in inputs.items()}
    return calls, {"baseline_rss_mb": baseline}


def torch_calls(spec: RuntimeSpec, inputs: dict[int, np.ndarray]) -> tuple[dict[int, Call], dict[str, Any]]:
    import torch

    from benchmarks.torch_runtimes import Bf16Network, ChannelsLastNetwork, eager
    from training.checkpoint import model_from_checkpoint

    torch.set_num_threads(spec.threads)
    baseline = peak_rss_mb()
    model, config, _ = model_from_checkpoint(spec.model)
    info: dict[str, Any] = {"baseline_rss_mb": baseline}
    tensors = {batch: torch.from_numpy(x) for batch, x in inputs.items()}
    smallest = min(tensors)
    if spec.name == "pytorch_bf16":
        network: torch.nn.Module = Bf16Network(model)
        del model
    else:  # fp32: the faster layout, each timed once at the smallest batch after an untimed call
        candidates: dict[str, torch.nn.Module] = {"contiguous": model, "channels_last": ChannelsLastNetwork(model)}
        probe: dict[str, float] = {}
        for layout, candidate in candidates.items():
            call = eager(candidate, config, tensors[smallest])
            call()
            started = time.perf_counter()
            call()
            probe[layout] = round(1000 * (time.perf_counter() - started), 1)
        chosen = min(probe, key=lambda layout: probe[layout])
        network = candidates[chosen]
        del model, candidates
        info |= {"layout": chosen, "layout_probe_ms": probe}
    calls = {batch: eager(network, config, x) for batch, x in tensors.items()}
    return {batch: (lambda c=c: c().num_dets.tolist()) for batch, c in calls.items()}, info


def serve(connection: Connection) -> None:
    """The worker's loop: receive the spec and the prepared batches, load, send the info with the memory baseline, run
    each batch size asked for, and report the peak when told to stop (None). Any failure is sent back as its
    traceback."""
    try:
        spec, inputs = connection.recv()
        loader = ort_calls if spec.name.startswith("ort_") else torch_calls
        calls, info = loader(spec, inputs)
        connection.send(info)
        while (batch := connection.recv()) is not None:
            connection.send(calls[batch]())
        connection.send({"peak_rss_mb": peak_rss_mb()})
    except Exception:  # the parent shows it and stops the part
        connection.send({"error": traceback.format_exc()})


class Worker:
    """The parent's handle on one worker process: ``worker(batch)`` runs the prepared batch of that size there and
    returns the detections per image; ``close()`` ends the process and returns its report."""

    def __init__(self, spec: RuntimeSpec, inputs: dict[int, np.ndarray]) -> None:
        self.spec = spec
        self.last_num_dets: list[int] = []
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=2,  # to stderr: the parent's stdout carries its report
            )
        self.connection = Connection(ours.detach())
        try:
            self.connection.send((spec, inputs))
            self.info: dict[str, Any] = self.receive()
        except BaseException:
            self.kill()
            raise

    def receive(self) -> Any:
        try:
            reply = self.connection.recv()
        except (EOFError, OSError):
            code = self.process.wait(10)
            raise RuntimeError(f"{self.spec.name} worker died (exit code {code})") from None
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"{self.spec.name} worker failed:\n{reply['error']}")
        return reply

    def __call__(self, batch: int) -> list[int]:
        self.connection.send(batch)
        self.last_num_dets = self.receive()
        return self.last_num_dets

    def close(self) -> dict[str, Any]:
        """Stop the worker; its info with the peak memory added."""
        self.connection.send(None)
        report = {**self.info, **self.receive()}
        self.process.wait(30)
        self.connection.close()
        report["peak_above_baseline_mb"] = round(report["peak_rss_mb"] - report["baseline_rss_mb"], 1)
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.connection.close()


@contextmanager
def workers(specs: list[RuntimeSpec], inputs: dict[int, np.ndarray]) -> Iterator[dict[str, Worker]]:
    """One worker per spec, started one after the other (a loading worker would slow a probing one); every one still
    running is ended on the way out."""
    started: dict[str, Worker] = {}
    try:
        for spec in specs:
            started[spec.name] = Worker(spec, inputs)
        yield started
    finally:
        for worker in started.values():
            worker.kill()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.runtime_worker FD``: serve on the socket ``FD`` the parent passed."""
    serve(Connection(int((sys.argv[1:] if argv is None else argv)[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""gRPC client of the served ensemble ``freesolo``: images in, COCO-style detections out (``serving.client_results``).

Torch-free: it needs tritonclient[grpc], numpy, Pillow. ``FreeSOLOClient`` (blocking; one per thread) and
``AsyncFreeSOLOClient`` (asyncio, ``tritonclient.grpc.aio``) are thin transports over one core (``_ClientCore``),
which decides every call, retry and result without doing I/O itself, so they share the behaviour:

- ``predict(images)``: paths, encoded bytes or H x W x 3 uint8 RGB arrays; a long list goes as requests of at most
  ``max_batch`` images (default: the server's ``max_batch_size``); returns one list of detections per image.
- each call has its own deadline (``timeout_s``); a call answered UNAVAILABLE (server down, starting, overloaded) is
  retried ``retries`` times with exponential backoff, and only that status: a rejected request would be rejected
  again, and one past its deadline may still be running.
- every failure is a ``ServingError`` with the server's own message (which image of the list, when it says).
- ``use_shared_memory=True`` sends the encoded images through a system shared-memory region registered with the
  server (only for a server on this machine); ``close()`` (or the context manager) unregisters and unlinks it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
import warnings
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils.shared_memory import SharedMemoryException

from serving.client_images import ImageInput, ImageInputError, encode_image
from serving.client_results import Detection, ModelInfo, model_info, response_detections
from serving.contract import ENSEMBLE, INPUT, MAX_REQUEST_IMAGE_BYTES, OUTPUT_NAMES
from serving.shared_memory import InputRegion, serialize_items

__all__ = ["AsyncFreeSOLOClient", "Detection", "FreeSOLOClient", "ImageInputError", "ModelInfo", "ServingError"]

DEFAULT_URL = "127.0.0.1:8001"
RETRIED = "UNAVAILABLE"
IN_USE = "currently in use"  # Triton's words when a region to unregister is still referenced by a request
BATCH_ITEM = re.compile(r"\bimage (\d+) of \d+: ")  # preprocess's words for an image of a batch
SINGLE_ITEM = re.compile(r"\bimage: ")  # ... and for the image of a batch of one
# gRPC's words for a connection lost mid-call (the server went away), and for one that was never made
DROPPED = re.compile(r"Stream removed|Socket closed|Connection reset|Broken pipe|GOAWAY", re.IGNORECASE)
UNREACHED = re.compile(r"failed to connect", re.IGNORECASE)
T = TypeVar("T")


class ServingError(RuntimeError):
    """The server refused or could not be reached. ``status`` is the gRPC status name (INVALID_ARGUMENT,
    UNAVAILABLE, ...), ``server_message`` the server's words, ``image_index`` the position in the ``predict`` list
    of the image the server complained about (None when it did not say)."""

    def __init__(
        self, message: str, status: str | None = None, server_message: str = "", image_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.image_index = image_index


def status_name(error: InferenceServerException) -> str | None:
    status = error.status()
    return str(status).removeprefix("StatusCode.") if status else None


def image_index(message: str, start: int, count: int) -> int | None:
    """Which image of the ``predict`` list a server message is about ("image 2 of 4", or the only one)."""
    found = BATCH_ITEM.search(message)
    if found:
        return start + int(found.group(1))
    return start if count == 1 and SINGLE_ITEM.search(message) else None


@dataclass(frozen=True)
class Rpc:
    """One call the core wants made: a method of tritonclient's gRPC client (the blocking and the asyncio clients
    name their methods alike), with its arguments."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pause:
    """Wait before the next step (a retry's backoff)."""

    seconds: float


# What the core's operations are: generators that yield the calls and pauses they need, receive each call's result
# (or its exception, thrown in), and return their value. A transport drives them, blocking or with asyncio.
Plan = Generator["Rpc | Pause", Any, T]


class _ClientCore:
    """Everything the blocking and the asyncio clients share, free of I/O: settings, batching, request building,
    retries, shared-memory bookkeeping, error wording and response reading. Each operation is a ``Plan``."""

    def __init__(
        self,
        url: str,
        model: str,
        timeout_s: float,
        retries: int,
        max_batch: int | None,
        use_shared_memory: bool,
        backoff_s: float,
    ) -> None:
        if "://" in url:
            raise ValueError(f"url: give HOST:PORT of the gRPC endpoint, without a scheme, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or (max_batch is not None and max_batch < 1):
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0, max_batch >= 1 (or None)")
        self.url, self.model, self.timeout_s, self.retries = url, model, timeout_s, retries
        self.max_batch, self.backoff_s = max_batch, backoff_s
        self.region = InputRegion() if use_shared_memory else None
        self._info: ModelInfo | None = None

    def rpc(self, method: str, *args: Any, **kwargs: Any) -> Rpc:
        return Rpc(method, args, {**kwargs, "client_timeout": self.timeout_s})

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1, 2, ...): exponential, at most 2 s."""
        return min(self.backoff_s * 2 ** (attempt - 1), 2.0)

    def call(self, what: str, rpc: Rpc, start: int = 0, count: int = 0) -> Plan[Any]:
        """``rpc``, retried ``retries`` times with backoff when answered UNAVAILABLE, and only then: a rejected
        request would be rejected again, and one past its deadline may still be running."""
        for attempt in range(1, self.retries + 2):
            try:
                return (yield rpc)
            except InferenceServerException as error:
                if status_name(error) != RETRIED or attempt > self.retries:
                    raise self.error(error, what, attempt, start, count) from None
            except SharedMemoryException as error:
                raise self.error(error, what, attempt) from None
            yield Pause(self.delay(attempt))
        raise AssertionError("unreachable")

    def error(self, error: Exception, what: str, attempts: int, start: int = 0, count: int = 0) -> ServingError:
        """A failure in the user's terms, keeping the server's message."""
        if isinstance(error, SharedMemoryException):
            return ServingError(f"{what}: shared memory failed on this machine: {error}")
        if not isinstance(error, InferenceServerException):
            return ServingError(f"{what} at {self.url}: {type(error).__name__}: {error}")
        status, message = status_name(error), error.message() or str(error)
        if status == RETRIED and DROPPED.search(message) and not UNREACHED.search(message):
            text = (
                f"the Triton server at {self.url} is unavailable: it dropped the connection during the request, so it "
                f"stopped or crashed ({what}; {attempts} attempts): {message}"
            )
            return ServingError(text, status, message)
        if status == RETRIED:
            text = f"cannot reach the Triton server at {self.url} ({what}; {attempts} attempts): {message}"
            return ServingError(text, status, message)
        if status == "DEADLINE_EXCEEDED":
            text = f"no answer from {self.url} within {self.timeout_s:g} s ({what})"
            return ServingError(text, status, message)
        index = image_index(message, start, count) if count else None
        about = f"image {index}: " if index is not None else ""
        text = f"{about}{message} ({status or 'client error'} from {self.url}, {what})"
        return ServingError(text, status, message, index)

    def info(self) -> Plan[ModelInfo]:
        """Batch limit, class names and category ids of the served model (fetched once)."""
        if self._info is None:
            reply = yield from self.call(
                "reading the model config", self.rpc("get_model_config", self.model, as_json=True)
            )
            self._info = model_info(reply)
        return self._info

    def predict(self, images: Sequence[ImageInput]) -> Plan[list[list[Detection]]]:
        """Detections of each image, in order."""
        self.check_images(images)
        size = self.batch_size((yield from self.info()))
        results: list[list[Detection]] = []
        for start, items in self.chunks(images, size):
            results += self.detections((yield from self.infer(start, items)))
        return results

    def infer(self, start: int, items: list[bytes]) -> Plan[Any]:
        """One request; the InferResult."""
        tensor, payload = self.input_tensor(items)
        if payload is not None:
            yield from self.place(tensor, payload)
        what = f"images {start}-{start + len(items) - 1}"
        return (yield from self.call(what, self.rpc("infer", self.model, [tensor]), start, len(items)))

    def place(self, tensor: grpcclient.InferInput, payload: bytes) -> Plan[None]:
        """Write the payload to the shared-memory region, (re)registering it when it had to grow."""
        region = self.region
        assert region is not None
        try:
            stale = region.ensure(len(payload))
        except SharedMemoryException as error:
            raise self.error(error, "growing the shared-memory region", 1) from None
        if stale is not None:
            yield from self.unregister(stale)
        if not region.registered:
            yield from self.call(
                "registering shared memory (the server must run on this machine)",
                self.rpc("register_system_shared_memory", region.name, region.key, region.capacity),
            )
            region.registered = True
        region.write(payload)
        tensor.set_shared_memory(region.name, len(payload))

    def unregister(self, name: str) -> Plan[None]:
        """Unregister a region. The server answers a request before it releases the request's input, so a region
        just used can be "currently in use" for a moment (measured: 1 in 100 unregistrations right after a
        response): wait for it. A server that is gone holds nothing; anything else is warned about (the server keeps
        the region registered until it restarts)."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in itertools.count(1):  # ends by the deadline
            try:
                yield self.rpc("unregister_system_shared_memory", name)
                return
            except InferenceServerException as error:
                message = error.message() or str(error)
                pause = min(0.005 * 2 ** (attempt - 1), 0.1)
                if IN_USE not in message or time.monotonic() + pause >= deadline:
                    if status_name(error) not in (RETRIED, "NOT_FOUND"):
                        warnings.warn(
                            f"shared-memory region {name} stays registered on {self.url}: {message}", stacklevel=2
                        )
                    return
            yield Pause(pause)

    def close(self) -> Plan[None]:
        """Unregister and unlink the shared-memory region (the transport closes the channel)."""
        if self.region is not None:
            if self.region.registered:
                yield from self.unregister(self.region.name)
            self.region.release()

    def batch_size(self, info: ModelInfo) -> int:
        """Images per request: the server's batch limit (or ``max_batch``); one for a dynamic model, whose images
        of one request would share one canvas and so change each other's detections."""
        server = max(info.max_batch_size, 1)
        if self.max_batch is not None and self.max_batch > server:
            raise ValueError(f"max_batch={self.max_batch} is more than the server's max_batch_size {server}")
        return 1 if info.dynamic_input else self.max_batch or server

    @staticmethod
    def check_images(images: Sequence[ImageInput]) -> None:
        """A single image where a list belongs would otherwise be read item by item."""
        if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError(f"predict takes a list of images, got {type(images).__name__}")

    def chunks(self, images: Sequence[ImageInput], size: int) -> Iterator[tuple[int, list[bytes]]]:
        """(index of the first image, encoded images) per request, encoded as they are sent: at most ``size``
        images and ``MAX_REQUEST_IMAGE_BYTES`` together, so that no request is over the gate's message limit."""
        start, total, items = 0, 0, list[bytes]()
        for index, image in enumerate(images):
            data = encode_image(image, index)
            if items and (len(items) == size or total + len(data) > MAX_REQUEST_IMAGE_BYTES):
                yield start, items
                start, total, items = index, 0, []
            items.append(data)
            total += len(data)
        if items:
            yield start, items

    def input_tensor(self, items: list[bytes]) -> tuple[grpcclient.InferInput, bytes | None]:
        """The request's input; with shared memory, also the payload to write to the region."""
        tensor = grpcclient.InferInput(INPUT, [len(items), 1], "BYTES")
        if self.region is None:
            data = np.empty((len(items), 1), dtype=np.object_)
            data[:, 0] = items
            tensor.set_data_from_numpy(data)
            return tensor, None
        return tensor, serialize_items(items)

    def detections(self, result: Any) -> list[list[Detection]]:
        assert self._info is not None
        return response_detections({name: result.as_numpy(name) for name in OUTPUT_NAMES}, self._info)


def _outcome(step: Rpc | Pause, grpc: Any) -> Any:
    """What a blocking transport does with one step."""
    if isinstance(step, Pause):
        time.sleep(step.seconds)
        return None
    return getattr(grpc, step.method)(*step.args, **step.kwargs)


class FreeSOLOClient:
    """Blocking client; not for sharing between threads (give each thread its own)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = ENSEMBLE,
        timeout_s: float = 60.0,
        retries: int = 3,
        max_batch: int | None = None,
        use_shared_memory: bool = False,
        backoff_s: float = 0.1,
    ) -> None:
        self._core = _ClientCore(url, model, timeout_s, retries, max_batch, use_shared_memory, backoff_s)
        self._grpc = grpcclient.InferenceServerClient(url)
        self._lock = threading.Lock()  # guards the shared-memory region and the cached model info

    @property
    def region(self) -> InputRegion | None:
        return self._core.region

    def _run(self, plan: Plan[T]) -> T:
        """Drive a plan: make its calls, sleep its pauses, hand back results and errors."""
        with self._lock:
            try:
                step = next(plan)
                while True:
                    try:
                        outcome = _outcome(step, self._grpc)
                    except Exception as error:
                        step = plan.throw(error)
                    else:
                        step = plan.send(outcome)
            except StopIteration as done:
                return done.value

    def info(self) -> ModelInfo:
        """Batch limit, class names and category ids of the served model (fetched once)."""
        return self._run(self._core.info())

    def predict(self, images: Sequence[ImageInput]) -> list[list[Detection]]:
        """Detections of each image, in order."""
        return self._run(self._core.predict(images))

    def close(self) -> None:
        """Unregister and unlink the shared-memory region, close the channel."""
        self._run(self._core.close())
        self._grpc.close()

    def __enter__(self) -> FreeSOLOClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFreeSOLOClient:
    """asyncio client: ``async with AsyncFreeSOLOClient(...) as client: await client.predict(...)``. Concurrent
    ``predict`` calls share one channel; with shared memory they take turns on the region."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = ENSEMBLE,
        timeout_s: float = 60.0,
        retries: int = 3,
        max_batch: int | None = None,
        use_shared_memory: bool = False,
        backoff_s: float = 0.1,
    ) -> None:
        self._core = _ClientCore(url, model, timeout_s, retries, max_batch, use_shared_memory, backoff_s)
        self._grpc: aio_grpcclient.InferenceServerClient | None = None  # made in the running loop
        self._lock: asyncio.Lock | None = None

    @property
    def region(self) -> InputRegion | None:
        return self._core.region

    def _client(self) -> aio_grpcclient.InferenceServerClient:
        if self._grpc is None:
            self._grpc = aio_grpcclient.InferenceServerClient(self._core.url)
            self._lock = asyncio.Lock()
        return self._grpc

    async def _run(self, plan: Plan[T], exclusive: bool) -> T:
        """Drive a plan with awaits; ``exclusive`` plans (the shared-memory region's) take turns."""
        client = self._client()
        assert self._lock is not None
        if exclusive:
            async with self._lock:
                return await self._drive(plan, client)
        return await self._drive(plan, client)

    @staticmethod
    async def _drive(plan: Plan[T], client: aio_grpcclient.InferenceServerClient) -> T:
        try:
            step = next(plan)
            while True:
                try:
                    if isinstance(step, Pause):
                        outcome = await asyncio.sleep(step.seconds)
                    else:
                        outcome = await getattr(client, step.method)(*step.args, **step.kwargs)
                except Exception as error:
                    step = plan.throw(error)
                else:
                    step = plan.send(outcome)
        except StopIteration as done:
            return done.value

    async def info(self) -> ModelInfo:
        """Batch limit, class names and category ids of the served model (fetched once)."""
        return await self._run(self._core.info(), exclusive=False)

    async def predict(self, images: Sequence[ImageInput]) -> list[list[Detection]]:
        """Detections of each image, in order."""
        return await self._run(self._core.predict(images), exclusive=self._core.region is not None)

    async def close(self) -> None:
        """Unregister and unlink the shared-memory region, close the channel."""
        if self._grpc is not None:
            await self._run(self._core.close(), exclusive=True)
            await self._grpc.close()
            self._grpc = None
        elif self._core.region is not None:
            self._core.region.release()

    async def __aenter__(self) -> AsyncFreeSOLOClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

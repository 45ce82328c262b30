"""gRPC client of the served ensemble ``freesolo``: images in, COCO-style detections out (``serving.client_results``).

Torch-free: it needs tritonclient[grpc], numpy, Pillow. ``FreeSOLOClient`` (blocking; one per thread) and
``AsyncFreeSOLOClient`` (asyncio, ``tritonclient.grpc.aio``) share the behaviour:

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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils.shared_memory import SharedMemoryException

from serving.client_images import ImageInput, ImageInputError, encode_image
from serving.client_results import Detection, ModelInfo, model_info, response_detections
from serving.contract import ENSEMBLE, INPUT, OUTPUT_NAMES
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


class _Settings:
    """What both clients share: settings, batching, request building, error wording."""

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

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1, 2, ...): exponential, at most 2 s."""
        return min(self.backoff_s * 2 ** (attempt - 1), 2.0)

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

    def unregister_again(self, name: str, error: InferenceServerException, attempt: int, deadline: float) -> bool:
        """Whether to retry unregistering a region. The server answers a request before it releases the request's
        input, so a region just used can be "currently in use" for a moment (measured: 1 in 100 unregistrations
        right after a response): wait for it. A server that is gone holds nothing; anything else is warned about
        (the server keeps the region registered until it restarts)."""
        message = error.message() or str(error)
        if IN_USE in message and time.monotonic() + self.unregister_pause(attempt) < deadline:
            return True
        if status_name(error) not in (RETRIED, "NOT_FOUND"):
            warnings.warn(f"shared-memory region {name} stays registered on {self.url}: {message}", stacklevel=3)
        return False

    @staticmethod
    def unregister_pause(attempt: int) -> float:
        return min(0.005 * 2 ** (attempt - 1), 0.1)

    def check_batch(self, info: ModelInfo) -> int:
        server = max(info.max_batch_size, 1)
        if self.max_batch is not None and self.max_batch > server:
            raise ValueError(f"max_batch={self.max_batch} is more than the server's max_batch_size {server}")
        return self.max_batch or server

    @staticmethod
    def check_images(images: Sequence[ImageInput]) -> None:
        """A single image where a list belongs would otherwise be read item by item."""
        if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError(f"predict takes a list of images, got {type(images).__name__}")

    def chunks(self, images: Sequence[ImageInput], size: int) -> Iterator[tuple[int, list[bytes]]]:
        """(index of the first image, encoded images) per request, encoded as they are sent."""
        for start in range(0, len(images), size):
            yield start, [encode_image(image, start + i) for i, image in enumerate(images[start : start + size])]

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


class FreeSOLOClient(_Settings):
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
        super().__init__(url, model, timeout_s, retries, max_batch, use_shared_memory, backoff_s)
        self._grpc = grpcclient.InferenceServerClient(url)
        self._lock = threading.Lock()  # guards the shared-memory region and the cached model info

    def _call(self, what: str, send: Callable[[], T], start: int = 0, count: int = 0) -> T:
        for attempt in range(1, self.retries + 2):
            try:
                return send()
            except InferenceServerException as error:
                if status_name(error) != RETRIED or attempt > self.retries:
                    raise self.error(error, what, attempt, start, count) from None
            except SharedMemoryException as error:
                raise self.error(error, what, attempt) from None
            time.sleep(self.delay(attempt))
        raise AssertionError("unreachable")

    def info(self) -> ModelInfo:
        """Batch limit, class names and category ids of the served model (fetched once)."""
        with self._lock:
            if self._info is None:
                config = self._call(
                    "reading the model config",
                    lambda: self._grpc.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s),
                )
                self._info = model_info(config)
            return self._info

    def predict(self, images: Sequence[ImageInput]) -> list[list[Detection]]:
        """Detections of each image, in order."""
        self.check_images(images)
        size = self.check_batch(self.info())
        results: list[list[Detection]] = []
        for start, items in self.chunks(images, size):
            results += self.detections(self._infer(start, items))
        return results

    def _infer(self, start: int, items: list[bytes]) -> Any:
        """One request; the InferResult."""
        tensor, payload = self.input_tensor(items)

        def send() -> Any:
            return self._grpc.infer(self.model, [tensor], client_timeout=self.timeout_s)

        what = f"images {start}-{start + len(items) - 1}"
        if payload is None:
            return self._call(what, send, start, len(items))
        with self._lock:
            self._place(tensor, payload)
            return self._call(what, send, start, len(items))

    def _place(self, tensor: grpcclient.InferInput, payload: bytes) -> None:
        """Write the payload to the shared-memory region, (re)registering it when it had to grow."""
        region = self.region
        assert region is not None
        try:
            stale = region.ensure(len(payload))
        except SharedMemoryException as error:
            raise self.error(error, "growing the shared-memory region", 1) from None
        if stale is not None:
            self._unregister(stale)
        if not region.registered:
            self._call(
                "registering shared memory (the server must run on this machine)",
                lambda: self._grpc.register_system_shared_memory(
                    region.name, region.key, region.capacity, client_timeout=self.timeout_s
                ),
            )
            region.registered = True
        region.write(payload)
        tensor.set_shared_memory(region.name, len(payload))

    def _unregister(self, name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        for attempt in itertools.count(1):  # ends by the deadline
            try:
                self._grpc.unregister_system_shared_memory(name, client_timeout=self.timeout_s)
                return
            except InferenceServerException as error:
                if not self.unregister_again(name, error, attempt, deadline):
                    return
            time.sleep(self.unregister_pause(attempt))

    def close(self) -> None:
        """Unregister and unlink the shared-memory region, close the channel."""
        with self._lock:
            if self.region is not None:
                if self.region.registered:
                    self._unregister(self.region.name)
                self.region.release()
            self._grpc.close()

    def __enter__(self) -> FreeSOLOClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFreeSOLOClient(_Settings):
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
        super().__init__(url, model, timeout_s, retries, max_batch, use_shared_memory, backoff_s)
        self._grpc: aio_grpcclient.InferenceServerClient | None = None  # made in the running loop
        self._lock: asyncio.Lock | None = None

    def _client(self) -> aio_grpcclient.InferenceServerClient:
        if self._grpc is None:
            self._grpc = aio_grpcclient.InferenceServerClient(self.url)
            self._lock = asyncio.Lock()
        return self._grpc

    async def _call(self, what: str, send: Callable[[], Awaitable[T]], start: int = 0, count: int = 0) -> T:
        for attempt in range(1, self.retries + 2):
            try:
                return await send()
            except InferenceServerException as error:
                if status_name(error) != RETRIED or attempt > self.retries:
                    raise self.error(error, what, attempt, start, count) from None
            except SharedMemoryException as error:
                raise self.error(error, what, attempt) from None
            await asyncio.sleep(self.delay(attempt))
        raise AssertionError("unreachable")

    async def info(self) -> ModelInfo:
        """Batch limit, class names and category ids of the served model (fetched once)."""
        client = self._client()
        if self._info is None:
            config = await self._call(
                "reading the model config",
                lambda: client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s),
            )
            self._info = model_info(config)
        return self._info

    async def predict(self, images: Sequence[ImageInput]) -> list[list[Detection]]:
        """Detections of each image, in order."""
        self.check_images(images)
        client = self._client()
        size = self.check_batch(await self.info())
        results: list[list[Detection]] = []
        for start, items in self.chunks(images, size):
            results += self.detections(await self._infer(client, start, items))
        return results

    async def _infer(self, client: aio_grpcclient.InferenceServerClient, start: int, items: list[bytes]) -> Any:
        """One request; the InferResult."""
        tensor, payload = self.input_tensor(items)

        def send() -> Awaitable[Any]:
            return client.infer(self.model, [tensor], client_timeout=self.timeout_s)

        what = f"images {start}-{start + len(items) - 1}"
        if payload is None:
            return await self._call(what, send, start, len(items))
        assert self._lock is not None
        async with self._lock:
            await self._place(client, tensor, payload)
            return await self._call(what, send, start, len(items))

    async def _place(self, client: aio_grpcclient.InferenceServerClient, tensor: Any, payload: bytes) -> None:
        """Write the payload to the shared-memory region, (re)registering it when it had to grow."""
        region = self.region
        assert region is not None
        try:
            stale = region.ensure(len(payload))
        except SharedMemoryException as error:
            raise self.error(error, "growing the shared-memory region", 1) from None
        if stale is not None:
            await self._unregister(client, stale)
        if not region.registered:
            await self._call(
                "registering shared memory (the server must run on this machine)",
                lambda: client.register_system_shared_memory(
                    region.name, region.key, region.capacity, client_timeout=self.timeout_s
                ),
            )
            region.registered = True
        region.write(payload)
        tensor.set_shared_memory(region.name, len(payload))

    async def _unregister(self, client: aio_grpcclient.InferenceServerClient, name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        for attempt in itertools.count(1):  # ends by the deadline
            try:
                await client.unregister_system_shared_memory(name, client_timeout=self.timeout_s)
                return
            except InferenceServerException as error:
                if not self.unregister_again(name, error, attempt, deadline):
                    return
            await asyncio.sleep(self.unregister_pause(attempt))

    async def close(self) -> None:
        """Unregister and unlink the shared-memory region, close the channel."""
        if self._grpc is not None and self.region is not None and self.region.registered:
            await self._unregister(self._grpc, self.region.name)
        if self.region is not None:
            self.region.release()
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def __aenter__(self) -> AsyncFreeSOLOClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

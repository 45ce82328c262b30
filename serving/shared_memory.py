"""A system shared-memory region for a client's input, so encoded images reach a server on the same machine without
being copied through the gRPC message (``tritonclient.utils.shared_memory``; torch-free).

The region holds one request's ``image_bytes`` in Triton's BYTES serialization (a 4-byte little-endian length before
each item). It grows by replacement (a new name, registered anew; the old one unregistered and unlinked) and is
unlinked on ``release`` or, failing that, when the owner is garbage collected or the interpreter exits.
"""

from __future__ import annotations

import os
import uuid
import weakref

import numpy as np
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import serialize_byte_tensor

MIN_CAPACITY = 1 << 16


def serialize_items(items: list[bytes]) -> bytes:
    """Triton's BYTES wire format of a [B, 1] tensor."""
    array = np.empty((len(items), 1), dtype=np.object_)
    array[:, 0] = items
    return bytes(serialize_byte_tensor(array).item())


class InputRegion:
    """One growing region; the owning client registers ``name``/``key`` with the server when ``registered`` is
    False and unregisters the names ``ensure`` hands back."""

    def __init__(self) -> None:
        self.prefix = f"freesolo_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        self.generation = 0
        self.name = ""
        self.capacity = 0
        self.registered = False
        self._handle: system_shm.SharedMemoryRegion | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def key(self) -> str:
        return f"/{self.name}"

    def ensure(self, size: int) -> str | None:
        """Room for ``size`` bytes; returns the name of a registered region that must be unregistered (it was
        replaced by a larger one), else None."""
        if self._handle is not None and size <= self.capacity:
            return None
        stale = self.name if self.registered else None
        self.release()
        self.generation += 1
        self.name = f"{self.prefix}_{self.generation}"
        self.capacity = max(MIN_CAPACITY, 1 << (max(size, 1) - 1).bit_length())
        handle = system_shm.create_shared_memory_region(self.name, self.key, self.capacity, create_only=True)
        self._handle = handle
        self._finalizer = weakref.finalize(self, system_shm.destroy_shared_memory_region, handle)
        return stale

    def write(self, payload: bytes) -> None:
        if self._handle is None or len(payload) > self.capacity:
            raise RuntimeError("ensure() the region's size before writing")
        system_shm.set_shared_memory_region(self._handle, [np.array(payload, dtype=np.object_)])

    def release(self) -> None:
        """Unlink the local region (the server's registration is the owner's business)."""
        if self._finalizer is not None:
            self._finalizer()
        self._handle = self._finalizer = None
        self.registered = False
        self.capacity = 0

"""Reading pickles without running code: detectron2 weight files (``.pkl``) are pickles, and an ordinary unpickler
calls whatever callable the file names. This one resolves only plain containers and numpy arrays, so a file that
tries anything else is refused before any of it runs."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import UserError

# (module, name) pairs a weights pickle may name: numpy's array reconstruction (under numpy 1 and numpy 2 module
# names), the array and dtype types, and the containers some writers use (an ordered dict for the state dict; a
# bytearray for an array's buffer below pickle protocol 5, as ``freesolo export-backbone`` writes them).
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): dict,
    ("builtins", "bytearray"): bytearray,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` knows only ``ALLOWED_GLOBALS``; persistent ids are refused too."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' (only containers and numpy arrays)")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id (not a plain weights pickle)")


def load_plain_pickle(path: Path, what: str = "pickle") -> Any:
    """The object a weights pickle holds (dicts, lists, strings, numbers, numpy arrays); anything else, and any
    truncated or foreign file, is one UserError naming the file. Python 2 pickles (Caffe2-era detectron2 files)
    decode their byte strings as latin-1, which is what numpy's array state needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as error:  # UnpicklingError, EOFError, ValueError, ...: every one means "not a plain pickle"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {what} {path}: {reason}") from None

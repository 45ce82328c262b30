"""Checkpoints are plain dicts of tensors and json-like values, so ``torch.load(weights_only=True)`` reads them:

    {"format": "freesolo/1", "config": Config.to_dict(), "model": state_dict,
     "metadata": {"run_id", "iteration", "class_names", "category_ids", ...},
     "optimizer": state_dict, "iteration": int}   # the last two only in resumable checkpoint.pt

Writes are atomic (temporary file + rename), so a run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from training.config import Config, config_from_dict
from training.errors import UserError
from training.fileio import atomic_write
from training.models import SOLOv2

FORMAT = "freesolo/1"
_REFUSED_BY_WEIGHTS_ONLY = "Weights only load failed"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))


def read_torch_file(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU, the project's only way to read a torch file; a missing or unreadable
    file is one UserError naming it. Torch's own message for a refused file advises ``weights_only=False``, which
    would run whatever code the file holds: it is replaced, never passed on."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing a foreign file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except Exception as error:  # torch raises many types for truncated/foreign files; all mean "unreadable"
        raise UserError(f"cannot read {what} {path}: not a {what} this project can read ({_why(error)})") from None


def _why(error: Exception) -> str:
    """What made ``torch.load(weights_only=True)`` refuse a file, without torch's advice to load it unsafely."""
    if isinstance(error, pickle.UnpicklingError) and _REFUSED_BY_WEIGHTS_ONLY in str(error):
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        holds = f" such as {found.group(1)}" if found else ""
        return f"it holds Python objects{holds} other than tensors and plain values, and loading those could run code"
    return "not a complete file written by torch.save"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a FreeSOLO checkpoint safely (weights_only); every failure is one UserError naming the file."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or not {"config", "model"} <= payload.keys():
        raise UserError(f"{path} is not a FreeSOLO checkpoint (expected a dict with 'config' and 'model')")
    try:
        config_from_dict(payload["config"])  # every reader rebuilds its model from it: refuse a bad one here, once
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return payload


def model_from_checkpoint(path: Path) -> tuple[SOLOv2, Config, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights; returns (model in eval mode, config, metadata)."""
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"])
    model = SOLOv2(config.model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not match its config ({str(error).splitlines()[0]})") from None
    return model.eval(), config, dict(payload.get("metadata", {}))

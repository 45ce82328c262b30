"""Checkpoints are plain dicts of tensors and json-like values, so ``torch.load(weights_only=True)`` reads them:

    {"format": "freesolo/1", "config": Config.to_dict(), "model": state_dict,
     "metadata": {"run_id", "iteration", "class_names", "category_ids", ...},
     "optimizer": state_dict, "iteration": int}   # the last two only in resumable checkpoint.pt

Writes are atomic (temporary file + rename), so a run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.config import Config, config_from_dict
from training.errors import UserError
from training.fileio import atomic_write
from training.models import SOLOv2

FORMAT = "freesolo/1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))


def read_torch_file(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU; a missing or unreadable file is one UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated/foreign files; all mean "unreadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {what} {path}: {reason}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a FreeSOLO checkpoint safely (weights_only); every failure is one UserError naming the file."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or not {"config", "model"} <= payload.keys():
        raise UserError(f"{path} is not a FreeSOLO checkpoint (expected a dict with 'config' and 'model')")
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

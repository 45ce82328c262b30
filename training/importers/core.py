"""What every importer shares: renaming rules from this project's tensor names to a source's, and the completeness
check (nothing missing, nothing left over, every shape right, no layer this project does not build).

A rule is a regular expression over *our* key and the source key it comes from, so an importer lists each of its
names once and the model built from the inferred config says which keys must exist."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from training.backbone_io import BATCH_COUNTER
from training.config import Config
from training.errors import UserError
from training.models import SOLOv2

# Parts of tensor names that exist only in layers this project does not build, with the feature the error names:
# mmdetection's DCN variants (backbone stages and the light head's last tower conv) carry the offset convs.
UNSUPPORTED_FEATURES = (("conv_offset", "deformable convolutions (DCN)"),)


@dataclass(frozen=True)
class Rule:
    """Our key ``pattern`` (a full-match regex) comes from the source key ``source(match)``."""

    pattern: str
    source: Callable[[re.Match[str]], str]

    def source_key(self, key: str) -> str | None:
        match = re.fullmatch(self.pattern, key)
        return None if match is None else self.source(match)


@dataclass
class ImportedModel:
    """A SOLOv2 config and its complete state dict, the class names the source records (if any) and a one-line
    description of what it was."""

    config: Config
    state: dict[str, Tensor]
    class_names: list[str] | None
    description: str


def shown(keys: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: an error line names a few keys, not hundreds."""
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def reject_unsupported(keys: Iterable[str], source: str) -> None:
    """One error naming the architecture feature (and a tensor of it) when the source uses a layer we do not build."""
    for key in keys:
        for marker, feature in UNSUPPORTED_FEATURES:
            if marker in key:
                raise UserError(f"{source}: uses {feature}, which this project does not build (e.g. '{key}')")


def tensor_state(payload: Any, source: str) -> dict[str, Tensor]:
    """A mapping of names to tensors (numpy arrays from pickles become tensors); anything else is an error."""
    if not isinstance(payload, Mapping) or not payload:
        raise UserError(f"{source}: no weights found (expected a mapping of tensor names to tensors)")
    state = {}
    for key, value in payload.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: a weight name is not a string ({key!r})")
        try:
            state[key] = value if isinstance(value, Tensor) else torch.from_numpy(value)
        except TypeError:
            raise UserError(f"{source}: '{key}' is not a tensor or numeric array ({type(value).__name__})") from None
    return state


def require(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise UserError(f"{source}: missing '{key}' (a partial or mislabelled file?)")
    return state[key]


def count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many consecutive numbered children ``prefix{0,1,...}.`` exist (a tower's depth, a list's length)."""
    count = 0
    while any(key.startswith(f"{prefix}{count}.") for key in state):
        count += 1
    return count


def map_weights(
    source_state: Mapping[str, Tensor],
    config: Config,
    rules: list[Rule],
    source: str,
    consumed: Callable[[str], bool] = lambda key: key.endswith(BATCH_COUNTER),
) -> dict[str, Tensor]:
    """Our model's complete state dict, every tensor taken from the source by ``rules``.

    Fails naming the keys when one of ours has no rule or its source tensor is missing, when a source tensor has
    the wrong shape, or when source tensors are left over (``consumed`` says which source keys may be left over
    because they carry no weights, like BatchNorm's batch counters)."""
    with torch.device("meta"):
        expected = SOLOv2(config.model).state_dict()
    mapped: dict[str, Tensor] = {}
    used: set[str] = set()
    unmapped, missing, reshaped = [], [], []
    for key, target in expected.items():
        source_key = next((name for rule in rules if (name := rule.source_key(key)) is not None), None)
        if source_key is None:
            unmapped.append(key)
        elif source_key not in source_state:
            missing.append(source_key)
        elif source_state[source_key].shape != target.shape:
            shape = list(source_state[source_key].shape)
            reshaped.append(f"{source_key} {shape} (expected {list(target.shape)})")
        else:
            mapped[key] = source_state[source_key].detach().to(target.dtype).clone()
            used.add(source_key)
    unexpected = [key for key in source_state if key not in used and not consumed(key)]
    for problem, keys in (
        ("no source for", unmapped),
        ("missing", missing),
        ("wrong shape for", reshaped),
        ("unexpected", unexpected),
    ):
        if keys:
            raise UserError(f"{source}: {problem} {shown(keys)} (the file does not match the architecture it implies)")
    return mapped

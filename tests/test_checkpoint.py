"""Reading checkpoints: one safe loader for every torch file, a refusal that never advises unsafe loading, and a
checkpoint's config checked for types before any model is built from it."""

from __future__ import annotations

import ast
import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint, read_torch_file
from training.cli import main
from training.errors import UserError

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "export", "serving", "benchmarks", "studies", "triton_plugins")


def unreadable_files(folder: Path) -> dict[str, Path]:
    """Files torch.load(weights_only=True) refuses, each for another reason."""
    files = {
        "numpy object": folder / "numpy.pt",
        "plain pickle": folder / "pickle.pt",
        "text": folder / "notes.pt",
        "empty": folder / "empty.pt",
    }
    torch.save({"model": {"w": torch.zeros(2)}, "extra": np.zeros(3)}, files["numpy object"])
    files["plain pickle"].write_bytes(pickle.dumps({"when": collections.OrderedDict(), "path": Path("x")}))
    files["text"].write_text("not a checkpoint")
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("kind", ["numpy object", "plain pickle", "text", "empty"])
def test_unreadable_file_is_not_a_checkpoint_and_no_advice_to_load_it_unsafely(tmp_path: Path, kind: str) -> None:
    path = unreadable_files(tmp_path)[kind]
    with pytest.raises(UserError) as caught:
        read_torch_file(path)
    message = str(caught.value)
    assert f"{path}: not a checkpoint this project can read" in message and len(message.splitlines()) == 1
    assert "weights_only" not in message and "trust" not in message.lower()


def test_object_checkpoint_on_the_command_line_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = unreadable_files(tmp_path)["numpy object"]
    assert main(["export", "onnx", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not a checkpoint this project can read" in error and str(path) in error
    assert "weights_only" not in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "num_classes", "six", "'model.num_classes' must be of type int, got 'six'"),
        ("model", "strides", [8, "16"], "'model.strides' must be list[int]"),
        ("inference", "score_thr", True, "'inference.score_thr' must be of type float, got True"),
        ("inference", "nms_kernel", 3, "'inference.nms_kernel' must be of type str"),
    ],
)
def test_checkpoint_config_of_the_wrong_type_is_refused_naming_the_file(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    key: str,
    value,
    message: str,
) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"][section][key] = value
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    assert main(["export", "onnx", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and str(path) in error
    assert not (tmp_path / "m.onnx").exists()


def test_every_torch_load_goes_through_the_safe_loader() -> None:
    """One place reads torch files (with weights_only=True and its own error message): a new torch.load elsewhere
    would bring back torch's advice to load unsafely, or unsafe loading itself."""
    callers = []
    for package in PACKAGES:
        for source in sorted((REPOSITORY / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                function = node.func if isinstance(node, ast.Call) else None
                target = function.value if isinstance(function, ast.Attribute) and function.attr == "load" else None
                if isinstance(target, ast.Name) and target.id == "torch":
                    callers.append(source.relative_to(REPOSITORY).as_posix())
    assert callers == ["training/checkpoint.py"]

"""Atomic writes: the data is on disk before the rename, and every file a run or a command writes is replaced
whole, so a reader (or a crash) sees the old file or the new one, never a mix or an empty one."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from training.config import load_preset, save_config
from training.fileio import atomic_write_text
from training.visualize import save_overlay


def test_file_is_synced_before_the_rename_and_its_folder_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records what each real fsync flushed (by inode) and whether the target had appeared yet."""
    target = tmp_path / "out" / "notes.txt"
    synced: list[tuple[int, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append((os.fstat(descriptor).st_ino, target.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert synced[0] == (target.stat().st_ino, False)  # the data, still under its temporary name
    if hasattr(os, "O_DIRECTORY"):
        assert synced[1:] == [(target.parent.stat().st_ino, True)]  # the folder, holding the rename


def test_config_yaml_is_replaced_whole(tmp_path: Path) -> None:
    """A reader that opened config.yaml before a save still reads the whole old file: the save wrote a new file
    and renamed it, instead of truncating the one being read."""
    path = tmp_path / "config.yaml"
    old = load_preset("tiny")
    new = dataclasses.replace(old, seed=7)
    save_config(old, path)
    with path.open(encoding="utf-8") as reader:
        save_config(new, path)
        assert yaml.safe_load(reader.read()) == old.to_dict()
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == new.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_overlay_png_is_replaced_whole(tmp_path: Path) -> None:
    """The same for the overlay PNGs of ``predict --vis`` and ``infer --vis``: an open viewer keeps the old picture."""
    path = tmp_path / "vis" / "0000_scene.png"
    image = np.full((40, 60, 3), 90, np.uint8)
    mask = np.zeros((40, 60), np.uint8, order="F")
    mask[5:20, 10:30] = 1
    found = [{"category_id": 1, "score": 0.9, "bbox": [10.0, 5.0, 20.0, 15.0], "segmentation": mask_utils.encode(mask)}]
    save_overlay(path, image, [], {1: "thing"})
    with path.open("rb") as reader:
        save_overlay(path, image, found, {1: "thing"})
        old = reader.read()
    with Image.open(io.BytesIO(old)) as picture:
        assert (np.asarray(picture.convert("RGB")) == 90).all()  # the old overlay: nothing drawn
    with Image.open(path) as picture:
        assert picture.format == "PNG" and (np.asarray(picture.convert("RGB")) != 90).any()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

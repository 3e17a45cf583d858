"""Safetensors files we write follow the umask, not the owner-only mode save_file gives them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file

from vmad.atomic import default_file_mode
from vmad.model.build import build_vmad
from vmad.tensor_io import save_safetensors


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_safetensors_round_trip_and_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
        path = tmp_path / "t.safetensors"
        save_safetensors(path, {"a": torch.arange(6.0).view(2, 3).t()}, metadata={"k": "v"})
        assert _mode(path) == 0o640
    finally:
        os.umask(old)
    assert torch.equal(load_file(path)["a"], torch.arange(6.0).view(2, 3).t())


def test_exported_model_weights_get_the_default_mode(tmp_path: Path) -> None:
    folder = build_vmad("tiny").save_trainable(tmp_path / "w")
    assert _mode(folder / "model.safetensors") == default_file_mode()

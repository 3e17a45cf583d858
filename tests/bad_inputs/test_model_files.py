"""Bad model and checkpoint files (issue 15): a damaged ``model.safetensors`` or ``config.json`` given to
``--model`` / ``load_pretrained`` is one VMADError naming the file (sizes refused before anything is
allocated), ``--resume`` falls back past damaged checkpoints, temporary folders of a killed run are cleaned
up, and ``vmad model export`` onto an existing file writes nothing."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.cli import main
from vmad.errors import ConfigError, VMADError
from vmad.model.build import build_vmad, load_pretrained
from vmad.train.config import load_train_config
from vmad.train.trainer import train
from vmad_testing import TINY_CONFIG, tiny_overrides, write_riad

# ------------------------------------------------------------------------------------------ model files


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vmad("tiny").save_trainable(tmp_path_factory.mktemp("model") / "ckpt")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(change(meta)))

    return edit


def _set_dim(section: str, key: str, value: int) -> Callable[[dict], object]:
    def change(meta: dict) -> dict:
        meta["config"][section][key] = value
        return meta

    return change


# (file to damage, how, text the error must contain)
MODEL_CASES = {
    "truncated_weights": ("model.safetensors", _truncate, "not a readable safetensors file"),
    "random_weights": ("model.safetensors", lambda p: p.write_bytes(os.urandom(4096)), "safetensors"),
    "empty_weights": ("model.safetensors", lambda p: p.write_bytes(b""), "safetensors"),
    "bad_json": ("config.json", lambda p: p.write_text('{"format": "vmad-trainable", '), "JSON"),
    "json_list": ("config.json", _edit_config(lambda meta: [meta]), "not a vmad-trainable file (a JSON list"),
    "no_config_key": (
        "config.json",
        _edit_config(lambda meta: {k: v for k, v in meta.items() if k != "config"}),
        "no 'config' mapping",
    ),
    "llm_hidden_1e9": ("config.json", _edit_config(_set_dim("llm", "hidden_size", 10**9)), "llm.hidden_size"),
    "decoder_dim_1e9": (
        "config.json",
        _edit_config(_set_dim("mask_decoder", "dim", 10**9)),
        "mask_decoder.dim",
    ),
    "vision_size_1e9": (
        "config.json",
        _edit_config(_set_dim("vision", "image_size", 10**9)),
        "vision.image_size",
    ),
    "vocab_1e9": ("config.json", _edit_config(_set_dim("llm", "vocab_rows", 10**9)), "llm.vocab_rows"),
}


def _damaged(saved_model: Path, tmp_path: Path, case: str) -> tuple[Path, str, str]:
    name, damage, problem = MODEL_CASES[case]
    folder = Path(shutil.copytree(saved_model, tmp_path / "damaged"))
    damage(folder / name)
    return folder, name, problem


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_damaged_model_folder_is_one_clear_error(saved_model: Path, tmp_path: Path, case: str) -> None:
    folder, name, problem = _damaged(saved_model, tmp_path, case)
    with pytest.raises(VMADError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert problem in message and str(folder / name) in message and "\n" not in message
    if "1e9" in case:  # refused by validation, before any layer is built
        assert isinstance(info.value, ConfigError) and "must be an integer in [" in message


@pytest.mark.parametrize(
    "case", ["truncated_weights", "random_weights", "bad_json", "json_list", "llm_hidden_1e9"]
)
def test_detect_with_damaged_model_prints_one_error_line(
    saved_model: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _, problem = _damaged(saved_model, tmp_path, case)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    assert main(["detect", str(image), "--model", str(folder), "--out", str(tmp_path / "det")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err


# ------------------------------------------------------------------------------------------ export


def test_export_onto_existing_file_writes_nothing(
    saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.write_text("keep me")
    before = sorted(tmp_path.iterdir())
    assert main(["model", "export", str(saved_model), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0], err
    assert out.read_text() == "keep me" and sorted(tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def riad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_riad(tmp_path_factory.mktemp("riad") / "data")


def _run(data: Path, out: Path, resume: bool = False, overwrite: bool = False):
    cfg = load_train_config(TINY_CONFIG, tiny_overrides(data, out, 4))
    return train(cfg, resume=resume, overwrite=overwrite)


@pytest.fixture(scope="module")
def finished_run(riad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run: checkpoint-2, checkpoint-4 (``latest``), final/."""
    out = tmp_path_factory.mktemp("run") / "out"
    _run(riad, out)
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    return out


def _random(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, path.stat().st_size)))


CHECKPOINT_CASES = {
    "truncated_optimizer": ("optimizer.safetensors", _truncate),
    "truncated_model": ("model/model.safetensors", _truncate),
    "random_rng": ("rng_rank0.safetensors", _random),
    "bad_state_json": ("trainer_state.json", lambda p: p.write_text('{"step": 4, ')),
    "state_json_list": ("trainer_state.json", lambda p: p.write_text("[4]")),
    "bad_optimizer_json": ("optimizer.json", lambda p: p.write_text("{")),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_resume_skips_damaged_newest_checkpoint(
    riad: Path, finished_run: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    name, damage = CHECKPOINT_CASES[case]
    damage(out / "checkpoint-4" / name)
    capsys.readouterr()
    result = _run(riad, out, resume=True)
    err = capsys.readouterr().err
    assert result.resumed_from == out / "checkpoint-2" and result.step == 4
    assert f"skipping checkpoint {out / 'checkpoint-4'}" in err and name.split("/")[-1] in err
    assert "resuming from checkpoint-2" in err
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_resume_with_no_usable_checkpoint(
    riad: Path, finished_run: Path, tmp_path: Path, overwrite: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    for step in (2, 4):
        _truncate(out / f"checkpoint-{step}" / "optimizer.safetensors")
    if not overwrite:  # refused: the damaged checkpoints are kept for the user to look at
        with pytest.raises(VMADError, match="no usable checkpoint") as info:
            _run(riad, out, resume=True)
        assert "checkpoint-2" in str(info.value) and "checkpoint-4" in str(info.value)
        assert (out / "checkpoint-4").is_dir()
        return
    result = _run(riad, out, resume=True, overwrite=True)
    assert result.resumed_from is None and result.step == 4
    assert "starting from step 0" in capsys.readouterr().err


STALE = {
    # leftovers of a killed run next to complete checkpoints: removed
    "tmp_and_old": ([".checkpoint-6.tmp", ".checkpoint-2.old", ".final.tmp", ".final.old"], "checkpoint-4"),
    # killed between commit's two renames: checkpoint-4 only exists as a finished .tmp -> moved into place
    "cut_rename_tmp": ([], "checkpoint-4"),
    # killed between the two renames with an unfinished .tmp: the .old copy is put back
    "cut_rename_old": ([], "checkpoint-4"),
}


@pytest.mark.parametrize("case", sorted(STALE))
def test_stale_temporary_folders_are_cleaned_up(
    riad: Path, finished_run: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    leftovers, expected = STALE[case]
    for name in leftovers:
        (out / name).mkdir()
        (out / name / "partial.safetensors").write_bytes(b"xx")
    if case == "cut_rename_tmp":
        os.replace(out / "checkpoint-4", out / ".checkpoint-4.tmp")
        shutil.copytree(out / "checkpoint-2", out / ".checkpoint-4.old")
    if case == "cut_rename_old":
        os.replace(out / "checkpoint-4", out / ".checkpoint-4.old")
        (out / ".checkpoint-4.tmp").mkdir()
    result = _run(riad, out, resume=True)
    assert result.resumed_from == out / expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    assert "left by a killed run" in capsys.readouterr().err

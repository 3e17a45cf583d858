"""Training configs: unknown keys, typed overrides, the shipped config files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vmad.errors import ConfigError
from vmad.train.config import load_train_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def test_unknown_keys_are_clear_errors() -> None:
    for override, where, key, valid in [
        ("train.bogus=1", "train", "bogus", "batch_size"),
        ("nonsense=1", "top-level", "nonsense", "output_dir"),
        ("model.vision.depth=3", "model.vision", "depth", "image_size"),
        ("dssl.boxes=3", "dssl", "boxes", "num_boxes"),
    ]:
        message = rf"^unknown {re.escape(where)} keys: \['{key}'\] \(valid: \[.*'{valid}'.*\]\)$"
        with pytest.raises(ConfigError, match=message):
            load_train_config(TINY, [override])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_train_config(TINY, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_train_config(TINY, ["train.max_steps"])


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_train_config(
        TINY, ["train.lr=1e-6", "train.max_steps=7", "data.root=/x", "output_dir=" + str(tmp_path)]
    )
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.root == "/x" and cfg.output_dir == str(tmp_path)
    assert cfg.model.to_dict() == load_train_config(TINY).model.to_dict()


def test_config_files_load() -> None:
    paper = load_train_config(REPO / "configs" / "paper.yaml")
    assert (paper.train.batch_size, paper.train.epochs, paper.train.lr) == (2, 10, 1e-6)
    assert paper.train.scheduler == "cosine" and paper.model.lora.r == 8
    assert (paper.dssl.num_boxes, paper.dssl.box_size, paper.dssl.capacity_divisor) == (32, 32, 20)
    small = load_train_config(REPO / "configs" / "small.yaml")
    assert small.model.preset == "small" and small.train.dssl
    for name in ("ddp", "deepspeed_zero2"):
        acc = yaml.safe_load((REPO / "configs" / "accelerate" / f"{name}.yaml").read_text())
        assert acc["num_processes"] == 8 and acc["mixed_precision"] == "bf16"
    assert acc["deepspeed_config"]["zero_stage"] == 2

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


def test_packaged_configs_by_name_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    from vmad.cli.train import data_overrides
    from vmad.train.config import packaged_configs, resolve_config_path

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    names = packaged_configs()
    assert {"tiny", "small", "paper", "vmad_small", "vmad_small_stage2", "accelerate/ddp"} <= set(names)
    assert all(p.is_file() and "vmad" in p.parts for p in names.values())  # inside the package
    assert load_train_config("tiny") == load_train_config("tiny.yaml") == load_train_config(TINY)
    assert resolve_config_path("accelerate/ddp").name == "ddp.yaml"
    with pytest.raises(ConfigError, match=r"nope: no such config file.*names: .*tiny"):
        load_train_config("nope")
    local = tmp_path / "tiny"  # an existing file wins over the packaged name
    local.write_text((REPO / "configs" / "tiny.yaml").read_text() + "output_dir: here\n")
    assert load_train_config("tiny").output_dir == "here"
    # reader options: --mask-name / --data-opt become data.options overrides, read as strings
    sets = data_overrides("{stem}_mask.png", ["folder.masks_dir=gt"])
    cfg = load_train_config(TINY, sets)
    assert (cfg.data.options.folder.mask_name, cfg.data.options.folder.masks_dir) == ("{stem}_mask.png", "gt")
    assert cfg.data.options.folder.default_split is None  # training reads a plain folder as "train"
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        data_overrides(None, ["bad"])


def test_referring_task_ratio_loads_and_is_checked() -> None:
    cfg = load_train_config("vmad_small_kind")
    assert cfg.data.tasks.seg_kind == 2.0 and cfg.data.tasks.seg_answer == 0.0
    assert load_train_config(TINY).data.tasks.seg_kind == 0.0  # off unless a config asks for it
    with pytest.raises(ConfigError, match="data.tasks ratios"):
        load_train_config(TINY, ["data.tasks.seg_kind=-1"])
    only_kind = load_train_config(TINY, ["data.tasks.seg=0", "data.tasks.seg_answer=0", "data.tasks.vqa=0",
                                         "data.tasks.seg_kind=1"])
    assert only_kind.data.tasks.seg_kind == 1.0

"""The one config mechanism (vmad.config): coercion of command-line strings, Literal choices, one unknown-key
error for every config, legacy configs, preset + override YAML files and `vmad model summary --config`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from vmad.baselines import build_baseline
from vmad.baselines.musc import MuScConfig
from vmad.cli import main
from vmad.config import apply_overrides, from_mapping, merge, parse_override, to_dict
from vmad.errors import ConfigError
from vmad.infer.detector import DetectorConfig, build_scorer
from vmad.model.build import preset_config
from vmad.model.config import VMADConfig
from vmad.model.dssl import DSSLConfig
from vmad.train.config import TrainConfig, load_train_config, normalize_saved_config, upgrade_legacy

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@dataclass
class Inner:
    mode: Literal["fast", "exact"] = "fast"
    depth: int = 1


@dataclass
class EveryKind:
    count: int = 0
    rate: float = 0.0
    flag: bool = False
    name: str = ""
    limit: int | None = 3
    mode: Literal["fast", "exact"] = "fast"
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, float] = (0, 0.0)
    names: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    anything: Any = None


def test_strings_are_coerced_to_each_declared_type() -> None:
    built = from_mapping(
        EveryKind,
        {
            "count": "7",
            "rate": "1e-6",
            "flag": "true",
            "name": "x",
            "limit": "null",
            "mode": "exact",
            "sizes": "1,3,5",
            "pair": "2,0.5",
            "names": "a, b",
            "weights": "{a: 1, b: 0.5}",
            "inner": {"mode": "exact", "depth": "4"},
            "anything": "kept",
        },
        "test",
    )
    assert built == EveryKind(
        count=7,
        rate=1e-6,
        flag=True,
        name="x",
        limit=None,
        mode="exact",
        sizes=(1, 3, 5),
        pair=(2, 0.5),
        names=["a", "b"],
        weights={"a": 1.0, "b": 0.5},
        inner=Inner(mode="exact", depth=4),
        anything="kept",
    )
    assert isinstance(built.rate, float) and isinstance(built.weights["a"], float)
    assert from_mapping(EveryKind, {"limit": "12", "flag": "no", "sizes": "", "names": "[c]"}, "test") == (
        EveryKind(limit=12, flag=False, sizes=(), names=["c"])
    )
    assert from_mapping(EveryKind, {"inner": None}, "test").inner == Inner()  # an empty YAML section


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("count", "many", "test.count must be an integer, got 'many'"),
        ("rate", "fast", "test.rate must be a number, got 'fast'"),
        ("flag", "maybe", "test.flag must be true or false, got 'maybe'"),
        ("count", None, "test.count may not be null"),
        ("sizes", "1,x", "test.sizes[1] must be an integer, got 'x'"),
        ("pair", "1,2,3", "test.pair must be 2 values, got '1,2,3'"),
        ("inner", {"mode": "slow"}, "test.inner.mode must be one of ['fast', 'exact'], got 'slow'"),
    ],
)
def test_bad_values_name_the_key(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(expected) + "$"):
        from_mapping(EveryKind, {key: value}, "test")


def test_set_overrides_are_coerced_from_strings() -> None:
    """Quoted --set values stay YAML strings; the mechanism converts them to the field types."""
    cfg = load_train_config(
        REPO / "configs" / "tiny.yaml",
        [
            "train.max_steps='7'",
            "train.lr='2e-4'",
            "train.progress='false'",
            "train.keep_checkpoints='null'",
            "train.betas='0.8,0.9'",
            "data.classes=pcb,tile",
            "data.tasks.vqa='0.5'",
            "data.split=val",
            "dssl.patch_tokens=crop",
            "model.llm.system_prompt=5",
            "model.seg_head.hidden='48'",
        ],
    )
    assert cfg.train.max_steps == 7 and cfg.train.lr == 2e-4 and cfg.train.progress is False
    assert cfg.train.keep_checkpoints is None and cfg.train.betas == [0.8, 0.9]
    assert cfg.data.classes == ["pcb", "tile"] and cfg.data.tasks.vqa == 0.5 and cfg.data.split == "val"
    assert cfg.dssl.patch_tokens == "crop" and cfg.model.seg_head.hidden == 48
    assert cfg.model.llm.system_prompt == "5"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dssl.patch_tokens=bogus", "dssl.patch_tokens must be one of ['crop', 'roi'], got 'bogus'"),
        ("model.vision.kind=vit", "model.vision.kind must be one of ['tiny', 'efficientnet_lite0', 'clip']"),
        ("model.llm.dtype=int8", "model.llm.dtype must be one of ['float32', 'bfloat16', 'float16']"),
        ("model.projector.refine=all", "model.projector.refine must be one of ['none', 'last', 'multi']"),
        ("model.score.rule=median", "model.score.rule must be one of ['max_smoothed', 'max', 'mean_topk']"),
        ("train.scheduler=step", "train.scheduler must be one of ['cosine', 'constant'], got 'step'"),
        ("data.split=dev", "data.split must be one of ['train', 'val', 'test'], got 'dev'"),
    ],
)
def test_literal_values_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(REPO / "configs" / "tiny.yaml", [override])


def test_literal_values_are_checked_on_direct_construction() -> None:
    with pytest.raises(ConfigError, match=re.escape("dssl.patch_tokens must be one of ['crop', 'roi']")):
        DSSLConfig(patch_tokens="bogus")
    with pytest.raises(ConfigError, match=re.escape("detector.answer_query must be one of")):
        DetectorConfig(answer_query="poem").validate()
    cfg = preset_config("tiny")
    cfg.mask_decoder.kind = "unet"  # type: ignore[assignment]
    message = "model.mask_decoder.kind must be one of ['scratch', 'sam'], got 'unet'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.validate()


def _unknown(where: str, key: str) -> str:
    return "^" + re.escape(f"unknown {where} keys: ['{key}'] (valid: [") + r".*\]\)$"


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda: VMADConfig.from_dict({"visoin": {}}), "model"),
        (lambda: VMADConfig.from_dict({"loss": {"visoin": 1}}), "model.loss"),
        (lambda: TrainConfig.from_dict({"visoin": 1}), "top-level"),
        (lambda: TrainConfig.from_dict({"train": {"visoin": 1}}), "train"),
        (lambda: TrainConfig.from_dict({"model": {"preset": "tiny", "llm": {"visoin": 1}}}), "model.llm"),
        (lambda: DSSLConfig.from_dict({"visoin": 1}), "dssl"),
        (lambda: TrainConfig.from_dict({"dssl": {"visoin": 1}}), "dssl"),
        (lambda: build_scorer("small", visoin="1"), "detector"),
        (lambda: build_baseline("musc", visoin="1"), "musc"),
        (lambda: from_mapping(MuScConfig, {"visoin": 1}, "musc"), "musc"),
    ],
)
def test_unknown_keys_have_one_error_format(build: Any, where: str) -> None:
    with pytest.raises(ConfigError, match=_unknown(where, "visoin")):
        build()


def test_baseline_and_detector_options_are_coerced() -> None:
    musc = from_mapping(MuScConfig, {"image_size": "64", "rscin_k": "1,2", "topmin_max": "0.5"}, "musc")
    assert (musc.image_size, musc.rscin_k, musc.topmin_max) == (64, (1, 2), 0.5)
    detector = from_mapping(DetectorConfig, {"threshold": "0.3", "answer_query": "impact"}, "detector")
    assert (detector.threshold, detector.answer_query) == (0.3, "impact")
    with pytest.raises(ConfigError, match=re.escape("detector.answer_query must be one of ['description'")):
        from_mapping(DetectorConfig, {"answer_query": "poem"}, "detector")


def test_legacy_training_config_moves_lambda_pbsd() -> None:
    legacy = TrainConfig().to_dict()
    legacy["dssl"]["lambda_pbsd"] = 0.5
    legacy["model"]["loss"]["extra"] = {}
    legacy["model"]["loss"]["pbsd"] = 0.0  # what training runs saved when train.dssl was off
    legacy["train"]["dssl"] = False
    upgraded = upgrade_legacy(legacy)
    expected = {"txt": 1.0, "seg": 1.0, "bce": 2.0, "dice": 0.5, "pbsd": 0.5, "verdict": 1.0}
    assert upgraded["model"]["loss"] == expected
    assert "lambda_pbsd" not in upgraded["dssl"] and legacy["dssl"]["lambda_pbsd"] == 0.5  # input untouched
    assert TrainConfig.from_dict(legacy).model.loss.pbsd == 0.5
    assert upgrade_legacy({"dssl": {"lambda_pbsd": 0.5}})["model"] == {"loss": {"pbsd": 0.5}}
    normalized = normalize_saved_config(legacy)
    assert normalized.keys() == TrainConfig().to_dict().keys() and normalized["model"]["loss"]["pbsd"] == 0.5
    assert normalized["dssl"] == DSSLConfig().to_dict() and normalize_saved_config(normalized) == normalized


def test_legacy_model_config_drops_empty_extra() -> None:
    saved = preset_config("tiny").to_dict()
    saved["loss"]["extra"] = {}
    saved["loss"]["pbsd"] = 0.25
    assert VMADConfig.from_dict(saved).loss.pbsd == 0.25
    saved["loss"]["extra"] = {"probe": 0.5}
    with pytest.raises(ConfigError, match=r"model\.loss\.extra \{'probe': 0\.5\}"):
        VMADConfig.from_dict(saved)


def test_pbsd_weight_lives_only_in_the_model_loss() -> None:
    assert "lambda_pbsd" not in DSSLConfig().to_dict()
    assert preset_config("small").loss.pbsd == 1.0 and "extra" not in preset_config("small").to_dict()["loss"]
    with pytest.raises(ConfigError, match="model.loss.pbsd must be >= 0"):
        load_train_config(REPO / "configs" / "tiny.yaml", ["model.loss.pbsd=-1"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_name_a_preset_and_resolve(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    model = data["model"]
    resolved = load_train_config(path)
    preset = preset_config(model["preset"])
    if set(model) == {"preset"}:
        assert resolved.model == preset
    else:
        assert resolved.model != preset
    assert resolved.model.to_dict() == merge(preset.to_dict(), model)
    defaults = TrainConfig().to_dict()
    for section in ("data", "train", "dssl"):  # only what differs from the defaults
        for key, value in (data.get(section) or {}).items():
            assert value != defaults[section][key], f"{path.name}: {section}.{key} is the default"
    assert resolved.to_dict() == normalize_saved_config(resolved.to_dict())


def test_efficientnet_recipes_do_not_mention_tiny_vit_fields() -> None:
    for name in ("small", "vmad_small", "vmad_small_stage2"):
        vision = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"].get("vision", {})
        assert not {"width", "layers", "heads", "patch"} & set(vision), name


def test_merge_and_overrides() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 0}
    assert merge(base, {"a": {"c": [3]}, "e": {"f": 1}}) == {"a": {"b": 1, "c": [3]}, "d": 0, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 0}
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    overridden = apply_overrides(base, ["a.b=2", "x.y=null"])
    assert overridden == {"a": {"b": 2, "c": [1, 2]}, "d": 0, "x": {"y": None}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(base, ["d.e=1"])
    assert to_dict(preset_config("tiny")) == preset_config("tiny").to_dict()


def test_model_summary_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "configs" / "vmad_small.yaml"
    expected = load_train_config(path).to_dict()
    assert main(["model", "summary", "--config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == expected and printed["model"]["vision"]["kind"] == "efficientnet_lite0"
    assert main(["model", "summary", "--config", str(path), "--json", "--set", "train.lr=1e-5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-5 and printed["model"] == expected["model"]
    assert main(["model", "summary", "--config", str(path), "--set", "train.bogus=1"]) == 2
    assert "unknown train keys: ['bogus']" in capsys.readouterr().err

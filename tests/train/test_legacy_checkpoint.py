"""A training checkpoint in the layout written before the restructuring (format version 1: token rows named
``new_token_embed``/``new_token_out``, a 0-dim ``logit_bias``, DSSL heads inside the model file under
``aux_modules.pbsd.``, ``dssl.lambda_pbsd``, no ``teacher``/``gather_memory``/``resize`` fields) resumes: the
loader names the settings it was trained with, and with them the run ends where an uninterrupted one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vmad.errors import ConfigError
from vmad.train.config import load_train_config
from vmad.train.trainer import train
from vmad_testing import TINY_CONFIG, tiny_overrides, write_riad

OLD_BEHAVIOUR = {
    "train.dssl": "true",
    "dssl.teacher": "separate",
    "model.vision.resize": "stretch",
    "model.backbone.resize": "stretch",
}


def _to_version_1(checkpoint: Path) -> None:
    """Rewrite a checkpoint written now into the layout of version 1."""
    weights = load_file(str(checkpoint / "model" / "model.safetensors"))
    renamed = {"new_token_rows.embed": "new_token_embed", "new_token_rows.out": "new_token_out"}
    old = {renamed.get(k, k): v for k, v in weights.items()}
    old["mask_decoder.logit_bias"] = old["mask_decoder.logit_bias"].reshape(())
    dssl = load_file(str(checkpoint / "dssl.safetensors"))
    old.update({f"aux_modules.pbsd.{k}": v for k, v in dssl.items()})
    save_file(old, str(checkpoint / "model" / "model.safetensors"))
    (checkpoint / "dssl.safetensors").unlink()
    meta = json.loads((checkpoint / "model" / "config.json").read_text())
    meta.update(version=1, aux_modules=["pbsd"])
    for section in ("vision", "backbone"):
        del meta["config"][section]["resize"]
    meta["config"]["loss"]["extra"] = {}
    (checkpoint / "model" / "config.json").write_text(json.dumps(meta))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    config = state["config"]
    for section in ("vision", "backbone"):
        del config["model"][section]["resize"]
    config["model"]["loss"]["extra"] = {}
    config["dssl"]["lambda_pbsd"] = config["model"]["loss"]["pbsd"]
    del config["dssl"]["teacher"], config["dssl"]["gather_memory"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def test_a_version_1_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    data = write_riad(tmp_path / "data")

    def run(out: str, resume: bool, **extra: object):  # noqa: ANN202
        sets = tiny_overrides(data, tmp_path / out, 4, **extra)
        return train(load_train_config(TINY_CONFIG, sets), resume=resume)

    run("whole", False, **OLD_BEHAVIOUR)
    assert run("old", False, **OLD_BEHAVIOUR, **{"train.stop_after": 2}).stopped_early
    _to_version_1(tmp_path / "old" / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"add --set dssl\.teacher=separate.*model\.vision\.resize=stretch"):
        run("old", True, **{"train.dssl": "true"})
    result = run("old", True, **OLD_BEHAVIOUR)
    assert result.resumed_from == tmp_path / "old" / "checkpoint-2" and result.step == 4
    resumed = load_file(str(tmp_path / "old" / "final" / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-5)

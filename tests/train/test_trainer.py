"""`vmad train`: batch sharding, a few tiny steps, checkpoints, and kill-and-resume giving identical weights
(config keys and files: test_config.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vmad.cli import main
from vmad.errors import ConfigError, VMADError
from vmad.model.build import load_pretrained
from vmad.model.weights_io import trainable_state_dict
from vmad.train import checkpoint as ckpt
from vmad.train.config import load_train_config
from vmad.train.dataset import EpochBatches
from vmad.train.trainer import Trainer, train
from vmad_testing import tiny_overrides, write_riad

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
@pytest.fixture(scope="module")
def riad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_riad(tmp_path_factory.mktemp("riad") / "data")


def run(data: Path, out: Path, steps: int, resume: bool = False, **extra: object):
    cfg = load_train_config(TINY, tiny_overrides(data, out, steps, **extra))
    return train(cfg, resume=resume)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------------------- batches, checkpoints


def test_batches_shard_without_overlap() -> None:
    ranks = [EpochBatches(10, 2, epoch=1, seed=3, rank=r, world=2) for r in range(2)]
    seen = [i for r in ranks for b in r for _, i in b]
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded by wrapping to full batches
    resumed = EpochBatches(10, 2, epoch=1, seed=3, rank=0, world=2, start=2)
    assert list(resumed) == ranks[0].batches[2:]


def test_find_latest_ignores_partial_writes(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-2").mkdir()
    ckpt.write_json(tmp_path / "checkpoint-2" / ckpt.STATE_FILE, {"step": 2})
    (tmp_path / "checkpoint-4").mkdir()  # killed before its state file: incomplete
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint-2"
    (tmp_path / ckpt.LATEST).write_text("checkpoint-4\n")  # a pointer to an incomplete folder is ignored
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint-2"


# ------------------------------------------------------------------------------------------ training


def test_verdict_head_trains_alone_and_is_logged(riad: Path, tmp_path: Path) -> None:
    """seg_head.verdict (OURS) with everything else frozen: only the head moves, loss_verdict is logged."""
    out = tmp_path / "verdict"
    frozen = "[projector,seg_head,neck,mask_decoder,new_token_rows,lora]"
    run(riad, out, 2, **{"model.seg_head.verdict": "true", "train.freeze": frozen, "train.dssl": "false"})
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_verdict"] is None or np.isfinite(r["loss_verdict"]) for r in rows)
    assert any(r["loss_verdict"] is not None for r in rows)
    final = weights(out / "final")
    from vmad.model.build import build_vmad

    start = build_vmad(load_train_config(TINY, tiny_overrides(riad, out, 2)).model).state_dict()
    assert float(final["seg_verdict.linear.weight"].abs().sum()) > 0  # moved from its zero start
    assert torch.equal(final["seg_head.net.0.weight"], start["seg_head.net.0.weight"])


def test_few_steps_log_checkpoint_final(riad: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(riad, out, 4)
    assert result.step == 4 and result.final_dir == out / "final"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("lr", "loss", "loss_txt", "loss_bce", "loss_dice", "loss_pbsd"):
        assert key in rows[0]
    for key in ("loss", "loss_txt", "loss_pbsd"):
        assert all(np.isfinite(r[key]) for r in rows)
    assert any(r["loss_bce"] is not None and r["loss_dice"] is not None for r in rows)
    assert rows[0]["lr"] > 0
    assert (out / "latest").read_text().strip() == "checkpoint-4"
    last = out / "checkpoint-4"
    names = {p.name for p in last.iterdir()}
    assert {
        "model",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "trainer_state.json",
    } <= names
    assert {"rng_rank0.safetensors", "rank0.json", "dssl_rank0.safetensors"} <= names
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["train"]["max_steps"] == 4
    memory = load_file(str(last / "dssl_rank0.safetensors"))
    assert "memory.meta" in memory and "generator" in memory
    model = load_pretrained(out / "final")
    trained = weights(last / "model")
    assert set(weights(out / "final")) == set(trained) == set(trainable_state_dict(model))
    for key, value in weights(out / "final").items():
        assert torch.equal(value, trained[key])
    dssl = load_file(str(last / "dssl.safetensors"))  # DSSL heads and Meta-Net: in checkpoints, not in final/
    assert any(k.startswith("dssl.meta_net.") for k in dssl)
    assert not (out / "final" / "dssl.safetensors").exists()
    with pytest.raises(ConfigError, match="--resume"):  # an existing run is not silently mixed in
        run(riad, out, 4)


def test_stop_and_resume_is_identical(riad: Path, tmp_path: Path) -> None:
    full = run(riad, tmp_path / "full", 5)
    part = tmp_path / "part"
    stopped = run(riad, part, 5, **{"train.stop_after": 3})
    assert stopped.stopped_early and stopped.step == 3 and stopped.final_dir is None
    assert ckpt.find_latest(part) == part / "checkpoint-2"
    resumed = run(riad, part, 5, resume=True)
    assert resumed.resumed_from == part / "checkpoint-2" and resumed.step == 5
    assert_identical(weights(full.final_dir), weights(resumed.final_dir))
    assert_identical(
        load_file(str(full.output_dir / "checkpoint-5" / "dssl_rank0.safetensors")),
        load_file(str(part / "checkpoint-5" / "dssl_rank0.safetensors")),
    )
    assert_identical(
        load_file(str(full.output_dir / "checkpoint-5" / "optimizer.safetensors")),
        load_file(str(part / "checkpoint-5" / "optimizer.safetensors")),
    )
    log_full = (full.output_dir / "log.jsonl").read_text().splitlines()
    log_part = (part / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log_part] == [1, 2, 3, 4, 5]
    assert log_full == log_part  # step 3 was logged twice, once before the stop: truncated on resume


def test_sigkill_and_resume_is_identical(riad: Path, tmp_path: Path) -> None:
    full = run(riad, tmp_path / "full", 6)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vmad", "train", str(TINY)]
    for item in tiny_overrides(riad, out, 6):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same arithmetic as this process
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while ckpt.find_latest(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    latest = ckpt.find_latest(out)
    assert latest is not None, err.decode()[-2000:]
    if proc.returncode != -signal.SIGKILL or int(latest.name.split("-")[1]) >= 6:
        pytest.skip("the subprocess finished before it could be killed")
    assert not (out / "final").exists()
    resumed = run(riad, out, 6, resume=True)
    assert resumed.resumed_from == latest
    assert_identical(weights(full.final_dir), weights(resumed.final_dir))


def test_cli_train_and_errors(riad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["train", str(TINY)]
    for item in tiny_overrides(riad, out, 2, **{"train.dssl": "false"}):
        args += ["--set", item]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_pbsd"] is None  # DSSL off
    assert main([*args, "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown train keys: ['nope'] (valid: [") and "Traceback" not in err


def test_init_from_starts_from_trained_weights(riad: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run(riad, first, 2)
    saved = weights(first / "final")

    def trainer(out: str, **extra: object) -> Trainer:
        return Trainer(load_train_config(TINY, tiny_overrides(riad, tmp_path / out, 2, **extra)))

    fine = trainable_state_dict(trainer("fine", **{"train.init_from": str(first / "final")}).model)
    fresh = trainable_state_dict(trainer("fresh").model)
    assert all(torch.equal(fine[k].cpu(), v) for k, v in saved.items())
    assert any(not torch.equal(fresh[k].cpu(), v) for k, v in saved.items())  # the 2 steps moved them
    with pytest.raises(VMADError, match="no such model folder"):
        trainer("bad", **{"train.init_from": str(tmp_path / "missing")})
    assert not (tmp_path / "bad").exists()
    # adding the OURS mask prompt on top of a checkpoint without one: it starts fresh, the rest is loaded
    prompted = trainer(
        "prompted", **{"train.init_from": str(first / "final"), "model.llm.mask_prompt_tokens": 2}
    )
    state = trainable_state_dict(prompted.model)
    assert all(torch.equal(state[k].cpu(), v) for k, v in saved.items())
    added = {k for k in state if k not in saved}
    # the OURS mask refiner: fresh on top of a checkpoint without one; left out by a config without one
    refined = trainer("refined", **{"train.init_from": str(first / "final"),
                                    "model.mask_decoder.refiner": True})
    assert any(k.startswith("mask_refiner.") for k in trainable_state_dict(refined.model))
    refined.model.save_trainable(tmp_path / "with_refiner")
    plain_trainer = trainer("plain", **{"train.init_from": str(tmp_path / "with_refiner")})
    plain = trainable_state_dict(plain_trainer.model)
    assert all(torch.equal(plain[k].cpu(), v) for k, v in saved.items())
    assert not any(k.startswith("mask_refiner.") for k in plain)
    frozen = trainer("frozen", **{"train.freeze": "[neck, mask_decoder, seg_head, lora]"}).model
    for name, p in frozen.named_parameters():
        part = "lora" if "lora_" in name else name.split(".")[0]
        assert p.requires_grad == (part in ("projector", "new_token_rows")), name
    assert set(trainable_state_dict(frozen)) == set(fresh)  # frozen parts are still saved
    kept = run(
        riad,
        tmp_path / "kept",
        2,
        **{"train.init_from": str(first / "final"), "train.freeze": "[neck, mask_decoder, seg_head]"},
    )
    after = weights(kept.final_dir)
    fixed = [k for k in saved if k.split(".")[0] in ("neck", "mask_decoder", "seg_head")]
    assert fixed and all(torch.equal(after[k], saved[k]) for k in fixed)
    assert any(not torch.equal(after[k], v) for k, v in saved.items() if k.startswith("projector."))
    with pytest.raises(ConfigError, match="unknown part"):
        trainer("typo", **{"train.freeze": "[decoder]"})
    with pytest.raises(ConfigError, match="no 'mask_prompt'"):
        trainer("absent", **{"train.freeze": "[mask_prompt]"})
    assert added == {k for k in state if k.startswith("mask_prompt.")} != set()

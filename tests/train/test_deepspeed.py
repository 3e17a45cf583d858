"""DeepSpeed ZeRO-2 with bf16 (the paper's engine) on this CPU: 2 steps, a checkpoint, a resume, and the
same weights as an uninterrupted run. Skipped without ``deepspeed`` (``pip install .[deepspeed]``)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vmad_testing import write_riad

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
pytestmark = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
RUNNER = Path(__file__).with_name("deepspeed_run.py")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(data: Path, out: Path, stop_after: int, tmp: Path) -> str:
    env = {**os.environ, "MASTER_PORT": _free_port(), "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions")}
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(data), str(out), "4", str(stop_after)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_zero2_bf16_steps_checkpoint_and_exact_resume(tmp_path: Path) -> None:
    data = write_riad(tmp_path / "data")
    assert "step=2 resumed=False" in _run(data, tmp_path / "split", 2, tmp_path)
    checkpoint = tmp_path / "split" / "checkpoint-2"
    assert (checkpoint / "accelerate").is_dir() and (checkpoint / "dssl.safetensors").is_file()
    assert "step=4 resumed=True" in _run(data, tmp_path / "split", 4, tmp_path)
    _run(data, tmp_path / "whole", 4, tmp_path)
    split = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    assert split.keys() == whole.keys() and all(torch.equal(split[k], whole[k]) for k in split)
    logs = [
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("split", "whole")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 4

"""Run by tests/train/test_deepspeed.py in a subprocess of its own (DeepSpeed initialises torch.distributed):
the tiny config with DSSL for ``max_steps`` steps under DeepSpeed ZeRO-2 + bf16 on the CPU, stopping after
``stop_after``, resuming from the latest checkpoint. Arguments: DATA OUT MAX_STEPS STOP_AFTER."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(key, value)


def main() -> None:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from vmad.train.config import load_train_config
    from vmad.train.trainer import Trainer

    data, out, max_steps, stop_after = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    overrides = {
        "data.root": data,
        "output_dir": out,
        "train.max_steps": max_steps,
        "train.stop_after": stop_after,
        "train.batch_size": 2,
        "train.save_every": 2,
        "train.log_every": 1,
        "train.progress": "false",
        "train.dssl": "true",
        "dssl.num_boxes": 4,
    }
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_train_config(tiny, [f"{k}={v}" for k, v in overrides.items()])
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2), mixed_precision="bf16")
    result = Trainer(cfg, accelerator=accelerator).fit(resume=True)
    print(f"step={result.step} resumed={result.resumed_from is not None}")


if __name__ == "__main__":
    main()

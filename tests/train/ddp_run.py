"""Run by tests/train/test_multiprocess.py under ``accelerate launch`` (several processes): ``vmad train
ARGS`` (:func:`vmad.cli.main`, unchanged), after which every rank writes ``rank<r>.json`` into the folder
named by ``VMAD_RANK_STATE_DIR``: the SHA-256 of each tensor its process holds (the whole training module,
trained and frozen, DSSL Meta-Net included, and its optimizer state), so the test can check that the
replicas are identical. Arguments: those of ``vmad`` (``train CONFIG --set ...``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def _digest(tensor: Any) -> str:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes()  # the bits, whatever the dtype
    return f"{flat.dtype}{tuple(tensor.shape)}:{hashlib.sha256(raw).hexdigest()}"


def _dump(trainer: Any, folder: Path) -> None:
    import torch

    digests = {f"module.{k}": _digest(v) for k, v in trainer.training_module.state_dict().items()}
    for pid, entry in trainer.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                digests[f"optimizer.{pid}.{key}"] = _digest(value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{trainer.rank}.json").write_text(json.dumps(digests, indent=0, sort_keys=True))


def main() -> int:
    from vmad.cli import main as vmad_main
    from vmad.train import trainer as trainer_module

    folder = Path(os.environ["VMAD_RANK_STATE_DIR"])
    fit = trainer_module.Trainer.fit

    def fit_and_dump(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = fit(self, *args, **kwargs)
        _dump(self, folder)
        return result

    trainer_module.Trainer.fit = fit_and_dump  # type: ignore[method-assign]
    return vmad_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

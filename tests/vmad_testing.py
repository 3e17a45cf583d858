"""Helpers shared by the test modules (importable: ``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SEG_Q = (
    "Are there any abnormalities present in the bottle? If so, please output the defect segmentation result."
)
TEXT_Q = "Are there any abnormalities present in the bottle?"


def loss_dict(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's forward plus the training loss (Eq. 6-7) as a flat dict: ``loss``, ``loss_txt``,
    ``loss_bce``/``loss_dice`` (0.0 without masks), ``mask_logits`` (None without masks)."""
    from vmad.train.losses import VMADLoss

    output = model(batch)
    terms = VMADLoss(model.config.loss)(model, batch, output)
    zero = torch.zeros(())
    return {
        "loss": terms.loss,
        "loss_txt": terms.txt,
        "loss_bce": terms.bce if terms.bce is not None else zero,
        "loss_dice": terms.dice if terms.dice is not None else zero,
        "mask_logits": output.mask_logits,
    }

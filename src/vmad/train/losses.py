"""The training objective of VMAD (Eq. 6-7 and 17), computed from the model's :class:`VMADOutput`.

L = λ_txt L_txt + λ_seg (λ_bce BCE + λ_dice DICE) + λ_pbsd L_pbsd, weights from ``model.loss``; L_pbsd only
when DSSL is on (``train.dssl``). OURS: a model with the ``<seg>`` verdict head adds λ_seg λ_verdict times
its image-level BCE to the segmentation term. :class:`TrainingModule` is what the trainer hands to
Accelerate (model and DSSL heads together, so DDP/DeepSpeed see every trained parameter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vmad.model.config import LossConfig
from vmad.model.mask_decoder import bce_loss, dice_loss
from vmad.model.outputs import VMADOutput
from vmad.model.vmad import VMADModel
from vmad.train.dssl_loss import DSSLLoss


@dataclass
class LossTerms:
    """The weighted total ``loss`` and each unweighted term; ``bce``/``dice`` are None when no sample of the
    batch had a segmentation answer, ``pbsd`` None without DSSL; ``dice_masks``: masks with a foreground
    pixel (Dice is taken over those); ``verdict``: BCE of the ``<seg>`` verdict (OURS; None without a
    verdict head or a segmentation answer)."""

    loss: Tensor
    txt: Tensor
    bce: Tensor | None
    dice: Tensor | None
    pbsd: Tensor | None
    dice_masks: int
    verdict: Tensor | None = None


def text_loss(output: VMADOutput) -> Tensor:
    """L_txt: cross-entropy of the supervised answer tokens (Eq. 6); 0 with a graph when there are none."""
    if output.answer_targets.numel() == 0:
        return output.hidden_states.sum() * 0.0
    return F.cross_entropy(output.answer_logits.float(), output.answer_targets)


def verdict_loss(verdict_logits: Tensor, mask_targets: Tensor) -> Tensor:
    """BCE of the ``<seg>`` verdict logits ``[S]`` against "the target mask ``[S, H, W]`` is not blank"."""
    anomalous = (mask_targets.flatten(1) > 0).any(1).float()
    return F.binary_cross_entropy_with_logits(verdict_logits.float(), anomalous)


class VMADLoss(nn.Module):
    """Eq. 7 over a :class:`VMADOutput`; ``dssl`` adds λ_pbsd L_pbsd."""

    def __init__(self, weights: LossConfig, dssl: DSSLLoss | None = None) -> None:
        super().__init__()
        self.weights = weights
        self.dssl = dssl

    def forward(self, model: VMADModel, batch: Mapping[str, Any], output: VMADOutput) -> LossTerms:
        w = self.weights
        txt = text_loss(output)
        bce = dice = verdict = None
        dice_masks = 0
        if output.mask_logits is not None and output.mask_targets is not None:
            bce, dice = (
                bce_loss(output.mask_logits, output.mask_targets),
                dice_loss(output.mask_logits, output.mask_targets),
            )
            seg = bce * w.bce + dice * w.dice
            dice_masks = int((output.mask_targets.flatten(1) > 0).any(1).sum())
            if output.verdict_logits is not None:
                verdict = verdict_loss(output.verdict_logits, output.mask_targets)
                seg = seg + w.verdict * verdict
        else:  # keeps Γ in the graph (DDP expects a gradient for every trained parameter)
            seg = sum(p.sum() for p in model.seg_head.parameters()) * 0.0
        loss = w.txt * txt + w.seg * seg
        pbsd = None
        if self.dssl is not None:
            pbsd = self.dssl(model, batch, output)
            loss = loss + w.pbsd * pbsd
        return LossTerms(loss, txt, bce, dice, pbsd, dice_masks, verdict)


class TrainingModule(nn.Module):
    """The model and its loss as one module: ``forward(batch)`` -> :class:`LossTerms`."""

    def __init__(self, model: VMADModel, loss: VMADLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Mapping[str, Any]) -> LossTerms:
        return self.loss(self.model, batch, self.model(batch))

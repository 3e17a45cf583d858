"""The ``<seg>`` verdict gate (OURS): the LLM's H̄_seg decides whether the mask may show anything.

The paper's decoder gets Γ(H̄_seg) as its only prompt (Eq. 4-5); a decoder trained on "segment the defect"
alone learns to read the defect from f and treats the prompt as a constant, so the mask does not depend on
the LLM. With ``seg_head.verdict`` on, a linear head on the normalised H̄_seg gives the log-odds v that the
image holds a defect, and every mask probability is multiplied by sigmoid(v):
p(pixel) = p(image anomalous | H̄_seg) * p_decoder(pixel). A normal verdict empties the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SegVerdict(nn.Module):
    """v = w · LayerNorm(H̄_seg) + b, the log-odds that the image is anomalous; starts at v = 0."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h_seg: Tensor) -> Tensor:
        """``[K, in_dim] -> [K]`` verdict logits."""
        return self.linear(self.norm(h_seg))[..., 0]


def gate_logits(mask_logits: Tensor, verdict: Tensor) -> Tensor:
    """logit(sigmoid(verdict) * sigmoid(mask_logits)) per pixel: ``mask_logits [K, H, W]``, ``verdict [K]``.
    """
    log_p = F.logsigmoid(mask_logits.float()) + F.logsigmoid(verdict.float())[:, None, None]
    log_p = log_p.clamp(max=-1e-7)  # p < 1, so log(1 - p) stays finite
    return log_p - torch.log(-torch.expm1(log_p))

"""Γ of Eq. 4: the ``<seg>`` token's last-layer hidden state -> the mask decoder's prompt width (256)."""

from __future__ import annotations

from torch import Tensor, nn


class SegHead(nn.Module):
    """H_seg = Γ(H̄_seg): Linear-ReLU-Linear (LISA's text_hidden_fcs).

    ``hidden`` None = the input width (OURS)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        """``[..., in_dim] -> [..., out_dim]``."""
        return self.net(h)

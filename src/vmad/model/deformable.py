"""Single-scale deformable attention in pure PyTorch (Sec. III-D, Eq. 18-19).

Each query owns a reference point p on the feature grid, predicts K offsets Δp per head from its own
features (Eq. 18: p' = p + s * Δp), samples the value map bilinearly at p' (``F.grid_sample``, no custom
CUDA op) and sums the K samples with softmax attention weights W_k predicted from the query (Eq. 19).

Coordinates are in grid cells: ``(x, y) = (column, row)``, cell centres at integer positions, so cell
(i, j) of a row-major token grid is the point ``(j, i)``. Samples outside the grid read zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grid_reference_points(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Centres of a row-major ``height x width`` token grid as ``[height * width, 2]`` (x, y) cell coords."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


class DeformableAttention(nn.Module):
    """Deformable attention of Eq. 18-19 over one feature map.

    Args:
        dim: channel width of queries and values (split over ``heads``).
        heads: attention heads; each head has its own offsets and weights.
        points: K, the sampled points per head and query (**OURS**, the paper gives no value).
        offset_scale: s of Eq. 19, the length in grid cells of one unit of predicted offset (**OURS**).

    Offsets start as Deformable DETR's: zero weights and a bias that places head h's point k on a ray at
    angle 2*pi*h/heads, k + 1 cells away; attention weights start uniform.
    """

    def __init__(self, dim: int, heads: int, points: int, offset_scale: float = 1.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.points, self.offset_scale = dim, heads, points, offset_scale
        self.sampling_offsets = nn.Linear(dim, heads * points * 2)
        self.attention_weights = nn.Linear(dim, heads * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        rays = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        rays = rays / rays.abs().max(dim=-1, keepdim=True).values
        rays = rays[:, None, :].repeat(1, self.points, 1)
        rays = rays * torch.arange(1, self.points + 1, dtype=torch.float32)[None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(rays.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, value: Tensor, reference: Tensor, hw: tuple[int, int]) -> Tensor:
        """Attend from ``query [B, Q, C]`` to ``value [B, H*W, C]`` (row-major) around ``reference``.

        ``reference`` is ``[Q, 2]`` or ``[B, Q, 2]`` in (x, y) cell coordinates. Returns ``[B, Q, C]``.
        """
        b, q, c = query.shape
        h, w = hw
        if value.shape != (b, h * w, c):
            raise ValueError(f"value shape {tuple(value.shape)} does not match {(b, h * w, c)}")
        nh, k, hd = self.heads, self.points, c // self.heads
        v = self.value_proj(value).view(b, h * w, nh, hd).permute(0, 2, 3, 1).reshape(b * nh, hd, h, w)
        offsets = self.sampling_offsets(query).view(b, q, nh, k, 2) * self.offset_scale
        ref = reference if reference.dim() == 3 else reference.unsqueeze(0).expand(b, -1, -1)
        loc = ref[:, :, None, None, :].to(offsets.dtype) + offsets  # Eq. 18, in cells
        # align_corners=False: the centre of cell i lies at (2i + 1) / size - 1 in [-1, 1].
        scale = torch.tensor([2.0 / w, 2.0 / h], dtype=loc.dtype, device=loc.device)
        grid = (loc * scale + scale / 2 - 1).permute(0, 2, 1, 3, 4).reshape(b * nh, q, k, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = self.attention_weights(query).view(b, q, nh, k).softmax(dim=-1)
        weights = weights.permute(0, 2, 1, 3).reshape(b * nh, 1, q, k)
        out = (sampled * weights).sum(dim=-1)  # Eq. 19: [B*heads, hd, Q]
        out = out.view(b, nh, hd, q).permute(0, 3, 1, 2).reshape(b, q, c)
        return self.output_proj(out)

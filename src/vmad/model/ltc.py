"""Locality-enhanced Token Compression, LTC (Sec. III-D, Fig. 4, Eq. 18-22).

``I_v [B, N, C]`` (last encoder layer) -> Local-Context Learner (L_c blocks of self-attention + deformable
attention, Eq. 18-19) -> Spatial-Preserving Downsampler (L_c ResNet blocks, adaptive average pooling by rho,
L_c ResNet blocks) = ``I_v↓ [B, M, C]`` -> coarse-to-fine refinement: each coarse query attends only to the
rho x rho fine cells under it at each level (Eq. 20), levels fused by concat + Linear (Eq. 21) -> residual
``I_v* = I_v↓ + V_att,all`` (Eq. 22) -> Linear-GELU-Linear to the LLM width D.

For a grid not divisible by rho the coarse grid has ``ceil(grid / rho)`` cells per side; fine row i belongs
to coarse row ``floor(i * coarse / grid)`` (likewise for columns), so the windows partition the fine grid and
each holds between 1 and rho x rho cells (padding slots are masked out of the attention). The pooling itself
uses PyTorch's adaptive windows, which may overlap by one cell there; for divisible grids both are the same
rho x rho blocks.

Starting from a pretrained MLP (OURS, ``projector.init_from_llava``): :meth:`LTC.start_from_mlp` copies
LLaVA's Linear-GELU-Linear into the final MLP and zeroes the last layer of every residual branch (self- and
deformable attention and feed-forward of each Local-Context block, each downsampler ResNet block, the Eq. 21
fusion), so at that point ``LTC(x) == mlp(avgpool_rho(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.errors import ConfigError
from vmad.model.deformable import DeformableAttention, grid_reference_points
from vmad.model.layers import LayerNorm2d, grid_side, map_to_tokens, tokens_to_map
from vmad.model.projectors import Projector, ProjectorConfig, mlp2x_gelu, pooled_side, sincos_2d


@lru_cache(maxsize=32)
def window_index(grid: int, rho: int) -> tuple[Tensor, Tensor]:
    """Fine tokens under each coarse cell (Eq. 20's rho x rho sub-regions).

    Returns ``index [M, rho*rho]`` (row-major fine-token ids; slot ``a * rho + b`` is the cell at offset
    (a, b) inside the window) and ``valid [M, rho*rho]`` (False for padding slots, which occur only when
    ``grid % rho != 0``), with ``M = ceil(grid / rho) ** 2``. Cached; do not modify the returned tensors.
    """
    side = pooled_side(grid, rho)
    owner = torch.arange(grid) * side // grid  # coarse row/column of each fine row/column (floor)
    first = torch.full((side,), grid, dtype=torch.long).scatter_reduce(0, owner, torch.arange(grid), "amin")
    rank = torch.arange(grid) - first[owner]  # offset inside the window
    if int(rank.max()) >= rho:
        raise AssertionError(f"window wider than rho for grid={grid}, rho={rho}")
    ii, jj = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coarse = (owner[ii] * side + owner[jj]).reshape(-1)
    slot = (rank[ii] * rho + rank[jj]).reshape(-1)
    index = torch.zeros(side * side, rho * rho, dtype=torch.long)
    valid = torch.zeros(side * side, rho * rho, dtype=torch.bool)
    index[coarse, slot] = torch.arange(grid * grid)
    valid[coarse, slot] = True
    return index, valid


@torch.no_grad()
def copy_mlp2x_gelu(mlp: nn.Sequential, linear_1: nn.Linear, linear_2: nn.Linear) -> None:
    """Copy a pretrained Linear-GELU-Linear into ``mlp`` (:func:`mlp2x_gelu`); a missing bias -> zeros."""
    for mine, theirs in ((mlp[0], linear_1), (mlp[2], linear_2)):
        if mine.weight.shape != theirs.weight.shape:
            raise ConfigError(
                f"pretrained projector layer {tuple(theirs.weight.shape)} does not fit "
                f"{tuple(mine.weight.shape)}; set projector.init_from_llava=false"
            )
        mine.weight.copy_(theirs.weight)
        if theirs.bias is not None:
            mine.bias.copy_(theirs.bias)
        else:
            mine.bias.zero_()


class ResBlock(nn.Module):
    """Pre-activation ResNet bottleneck (1x1, 3x3, 1x1 convolutions; LayerNorm2d + SiLU).

    Bottleneck form, LayerNorm instead of BatchNorm (batch size 1-2 in training) and SiLU follow Honeybee's
    C-Abstractor: OURS, the paper says only "ResNet blocks".
    """

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        mid = max(1, round(dim * ratio))
        self.body = nn.Sequential(
            LayerNorm2d(dim, eps=1e-5), nn.SiLU(), nn.Conv2d(dim, mid, 1),
            LayerNorm2d(mid, eps=1e-5), nn.SiLU(), nn.Conv2d(mid, mid, 3, padding=1),
            LayerNorm2d(mid, eps=1e-5), nn.SiLU(), nn.Conv2d(mid, dim, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention; fixed 2D sin-cos positions are added to queries and keys only (OURS)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pos: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k = self.qk(x if pos is None else x + pos).chunk(2, dim=-1)
        heads = [t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, self.v(x))]
        out = F.scaled_dot_product_attention(*heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LocalContextBlock(nn.Module):
    """One Local-Context Learner block: self-attention, deformable attention around each token's own grid
    position (Eq. 18-19), then a feed-forward layer (OURS; ``ffn_ratio=0`` removes it). Pre-norm residuals."""

    def __init__(self, dim: int, heads: int, points: int, offset_scale: float, ffn_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.deform = DeformableAttention(dim, heads, points, offset_scale)
        hidden = int(dim * ffn_ratio)
        self.ffn = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            if hidden > 0
            else None
        )

    def forward(self, x: Tensor, reference: Tensor, pos: Tensor, side: int) -> Tensor:
        x = x + self.attn(self.norm1(x), pos)
        y = self.norm2(x)
        x = x + self.deform(y, y, reference, (side, side))
        return x + self.ffn(x) if self.ffn is not None else x


class LocalContextLearner(nn.Module):
    """L_c :class:`LocalContextBlock` s over the full-resolution token grid (Sec. III-D.1)."""

    def __init__(self, dim: int, blocks: int, heads: int, points: int, offset_scale: float, ffn_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            LocalContextBlock(dim, heads, points, offset_scale, ffn_ratio) for _ in range(blocks)
        )

    def forward(self, x: Tensor, side: int) -> Tensor:
        reference = grid_reference_points(side, side, x.device)
        pos = sincos_2d(reference, x.shape[-1]).to(x.dtype)
        for block in self.blocks:
            x = block(x, reference, pos, side)
        return x


class SpatialPreservingDownsampler(nn.Module):
    """L_c ResNet blocks -> adaptive average pooling to ``ceil(grid / rho)`` per side -> L_c ResNet blocks."""

    def __init__(self, dim: int, blocks: int, rho: int, ratio: float) -> None:
        super().__init__()
        self.rho = rho
        self.pre = nn.Sequential(*(ResBlock(dim, ratio) for _ in range(blocks)))
        self.post = nn.Sequential(*(ResBlock(dim, ratio) for _ in range(blocks)))

    def forward(self, x: Tensor, side: int) -> Tensor:
        y = self.pre(tokens_to_map(x, side))
        y = F.adaptive_avg_pool2d(y, pooled_side(side, self.rho))
        return map_to_tokens(self.post(y))


class WindowCrossAttention(nn.Module):
    """Eq. 20 for one level: ``softmax(Q_l↓ K_l^T / sqrt(d)) V_l`` where each coarse query sees only the
    fine cells of its own window. Batched as ``[B*M, heads, 1 | rho*rho, d/heads]`` (no M x N attention).

    With ``pos_embed`` a learned embedding of the slot inside the window is added to the keys (OURS).
    """

    def __init__(self, dim: int, level_dim: int, heads: int, rho: int, pos_embed: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(level_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(level_dim, dim)
        self.v = nn.Linear(level_dim, dim)
        self.pos = nn.Parameter(torch.randn(rho * rho, dim) * 0.02) if pos_embed else None
        self.out = nn.Linear(dim, dim)

    def forward(self, coarse: Tensor, fine: Tensor, index: Tensor, valid: Tensor | None) -> Tensor:
        b, m, d = coarse.shape
        w, nh = index.shape[1], self.heads
        f = self.norm_kv(fine)
        flat = index.reshape(-1)
        k = self.k(f).index_select(1, flat).view(b, m, w, d)
        if self.pos is not None:
            k = k + self.pos
        v = self.v(f).index_select(1, flat).view(b, m, w, d)
        q = self.q(self.norm_q(coarse)).reshape(b * m, 1, nh, d // nh).transpose(1, 2)
        k = k.reshape(b * m, w, nh, d // nh).transpose(1, 2)
        v = v.reshape(b * m, w, nh, d // nh).transpose(1, 2)
        mask = None if valid is None else valid.repeat(b, 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B*M, heads, 1, d/heads]
        return self.out(out.reshape(b, m, d))


class CoarseToFineRefinement(nn.Module):
    """Coarse-to-fine injection from one or more fine feature maps (Eq. 20) fused by Eq. 21:
    ``V_att,all = Linear(cat([V_att,l for each level]))``. Returns V_att,all ``[B, M, dim]``."""

    def __init__(self, dim: int, level_dims: Sequence[int], heads: int, rho: int, pos_embed: bool) -> None:
        super().__init__()
        if not level_dims:
            raise ConfigError("coarse-to-fine refinement needs at least one level")
        self.rho = rho
        self.level_dims = list(level_dims)
        self.levels = nn.ModuleList(WindowCrossAttention(dim, c, heads, rho, pos_embed) for c in level_dims)
        self.fuse = nn.Linear(len(self.level_dims) * dim, dim)

    def forward(self, coarse: Tensor, fines: Sequence[Tensor], side: int) -> Tensor:
        if len(fines) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} fine levels, got {len(fines)}")
        index, valid = window_index(side, self.rho)
        if coarse.shape[1] != index.shape[0]:
            raise ValueError(f"{coarse.shape[1]} coarse tokens do not match grid {side} with rho {self.rho}")
        for f, c in zip(fines, self.level_dims, strict=True):
            if f.shape[0] != coarse.shape[0] or f.shape[1] != side * side or f.shape[2] != c:
                raise ValueError(f"fine level shape {tuple(f.shape)} != {(coarse.shape[0], side * side, c)}")
        index = index.to(coarse.device)
        valid_mask = None if bool(valid.all()) else valid.to(coarse.device)
        outs = [att(coarse, f, index, valid_mask) for att, f in zip(self.levels, fines, strict=True)]
        return self.fuse(torch.cat(outs, dim=-1))


class LTC(Projector):
    """The LTC projector Ψ (Sec. III-D). See the module docstring for the data flow.

    Ablations (Table V) via :class:`ProjectorConfig`: ``use_local_context`` switches the Local-Context
    Learner, ``refine`` chooses no injection ("Baseline"), injection from the last layer (VMAD°) or from the
    n earlier levels (full VMAD). Keys and values of the injection are the *original* encoder features
    (Eq. 20).
    """

    def __init__(self, cfg: ProjectorConfig, in_dim: int, level_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        cfg.validate()
        dim = cfg.hidden or in_dim
        if dim % cfg.heads != 0:
            raise ConfigError(f"LTC width {dim} is not divisible by projector.heads={cfg.heads}")
        self.rho, self.refine_mode, self.n_levels = cfg.rho, cfg.refine, cfg.n_levels
        self.include_last = cfg.refine == "last" or (cfg.refine == "multi" and cfg.multi_include_last)
        self.in_proj: nn.Module = nn.Linear(in_dim, dim) if dim != in_dim else nn.Identity()
        self.local_context = (
            LocalContextLearner(dim, cfg.local_blocks, cfg.heads, cfg.points, cfg.offset_scale, cfg.ffn_ratio)
            if cfg.use_local_context
            else None
        )
        self.downsampler = SpatialPreservingDownsampler(dim, cfg.local_blocks, cfg.rho, cfg.resnet_ratio)
        fine_dims = list(level_dims) if cfg.refine == "multi" else []
        if self.include_last:
            fine_dims.append(in_dim)
        self.refinement = None
        if fine_dims:
            self.refinement = CoarseToFineRefinement(dim, fine_dims, cfg.heads, cfg.rho, cfg.window_pos_embed)
        self.head = mlp2x_gelu(dim, out_dim)

    def compress(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        """I_v* of Eq. 22 at the LTC width, before the MLP to the LLM width: ``[B, M, hidden]``."""
        side = grid_side(last.shape[1])
        x = self.in_proj(last)
        if self.local_context is not None:
            x = self.local_context(x, side)
        coarse = self.downsampler(x, side)  # I_v↓
        if self.refinement is None:
            return coarse
        fines: list[Tensor] = []
        if self.refine_mode == "multi":
            if len(levels) != self.n_levels:
                raise ValueError(f"LTC with refine='multi' needs {self.n_levels} levels, got {len(levels)}")
            fines.extend(levels)
        if self.include_last:
            fines.append(last)
        return coarse + self.refinement(coarse, fines, side)  # Eq. 22

    def forward(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        return self.head(self.compress(last, levels))

    def num_output_tokens(self, grid: int) -> int:
        return pooled_side(grid, self.rho) ** 2

    def residual_outputs(self) -> list[nn.Module]:
        """The last layer of every residual branch: zeroed, the LTC is ``head(avgpool_rho(in_proj(x)))``."""
        layers: list[nn.Module] = []
        if self.local_context is not None:
            for block in self.local_context.blocks:
                layers += [block.attn.proj, block.deform.output_proj]
                if block.ffn is not None:
                    layers.append(block.ffn[-1])
        for res in [*self.downsampler.pre, *self.downsampler.post]:
            layers.append(res.body[-1])
        if self.refinement is not None:
            layers.append(self.refinement.fuse)  # V_att,all = 0 in Eq. 22
        return layers

    @torch.no_grad()
    def start_from_mlp(self, linear_1: nn.Linear, linear_2: nn.Linear) -> None:
        """Copy a pretrained Linear-GELU-Linear (LLaVA-1.5's projector) into the final MLP and zero the last
        layer of each residual branch (:meth:`residual_outputs`): the output is then
        ``mlp(avgpool_rho(x))``, pooled versions of the tokens that MLP was trained to feed its LLM (OURS).

        Needs the LTC working width to be the encoder width (``projector.hidden`` null or equal to it), the
        GELU to be exact and matching shapes; a missing bias is copied as zeros.
        """
        if not isinstance(self.in_proj, nn.Identity):
            raise ConfigError(
                "starting the LTC from a pretrained MLP needs projector.hidden null (the encoder width); "
                "set projector.init_from_llava=false to use another width"
            )
        copy_mlp2x_gelu(self.head, linear_1, linear_2)
        for layer in self.residual_outputs():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()

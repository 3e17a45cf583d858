"""Visual projectors Ψ: vision-encoder tokens -> LLM input embeddings (Sec. III-D, Table V).

Every projector maps ``last [B, N, C]`` (the encoder's last layer, N = grid * grid tokens, row-major) and
``levels`` (the n earlier layers, oldest first, ``[B, N, C_l]``) to ``[B, M, D]`` tokens of LLM width D.
``vmad.model.build.build_projector`` assembles them from a :class:`ProjectorConfig`:

- ``ltc``: Locality-enhanced Token Compression, the paper's projector (see :mod:`vmad.model.ltc`);
- ``mlp``: LLaVA-1.5's Linear-GELU-Linear on every token (M = N);
- ``avgpool``: 2D average pooling by rho, then the same MLP;
- ``resampler``: learned queries with cross-attention (Q-Former / Qwen-VL style);
- ``ldpv2``: MobileVLM v2's LDP-v2 (pointwise MLP, 2x2 average pooling, depthwise-conv PEG with residual).

Grids not divisible by rho are pooled to ``ceil(grid / rho)`` per side (adaptive pooling).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.config import check_choices, from_mapping, to_dict
from vmad.errors import ConfigError
from vmad.model.deformable import grid_reference_points
from vmad.model.layers import grid_side, map_to_tokens, tokens_to_map

ProjectorKind = Literal["ltc", "mlp", "avgpool", "resampler", "ldpv2"]
RefineMode = Literal["none", "last", "multi"]
PROJECTOR_KINDS: tuple[str, ...] = get_args(ProjectorKind)
REFINE_MODES: tuple[str, ...] = get_args(RefineMode)


@dataclass
class ProjectorConfig:
    """Projector choice and hyper-parameters. Fields marked OURS are not given by the paper.

    Attributes:
        kind: one of ``ltc``, ``mlp``, ``avgpool``, ``resampler``, ``ldpv2`` (Table V rows).
        rho: downsampling rate per side (paper: 2, so 24x24 = 576 -> 12x12 = 144 tokens).
        n_levels: n, the earlier encoder levels used by multi-level integration (paper: 4, Eq. 21).
        use_local_context: LTC's Local-Context Learner on/off (self-attention + deformable attention).
        refine: LTC's coarse-to-fine injection (Eq. 20): ``none`` = downsampler only (Table V "Baseline"),
            ``last`` = from the last layer only (VMAD°, "+ Injection"), ``multi`` = from the n earlier levels
            fused by Eq. 21 (full VMAD, "+ Multi-level Feature").
        multi_include_last: OURS. With ``refine="multi"``, also inject from the last layer (cumulative
            reading of Table V); Eq. 21 itself lists only the n earlier levels, hence the default False.
        local_blocks: L_c, the number of Local-Context Learner blocks and of ResNet blocks on each side
            of the pooling (OURS: 2).
        heads: attention heads in LTC's self-, deformable and window attention and in the resampler (OURS).
        points: K, deformable sampling points per head and query (OURS: 4).
        offset_scale: s of Eq. 19, grid cells per unit of predicted offset (OURS: 1.0).
        hidden: LTC working width; None uses the encoder width C (OURS).
        ffn_ratio: hidden ratio of the feed-forward layer closing each Local-Context Learner block and each
            resampler layer; 0 removes it (OURS: 2.0).
        resnet_ratio: bottleneck ratio of the downsampler's ResNet blocks (OURS: 0.5).
        window_pos_embed: OURS. Add a learned embedding of the position inside the rho x rho window to the
            keys of the coarse-to-fine attention (otherwise the window attention is permutation-blind).
        num_queries: resampler queries; None uses ``ceil(grid / rho) ** 2`` at the build grid (144 at 24).
        resampler_layers: cross-attention layers of the resampler (OURS: 1, as Qwen-VL).
        init_from_llava: OURS. When the LLM comes from a LLaVA folder with a ``multi_modal_projector``
            (paper preset), start from it: the LTC's final MLP gets its weights and the LTC's residual
            branches start at zero (so Ψ(x) = LLaVA's MLP on the rho x rho average-pooled tokens at step 0,
            :meth:`vmad.model.ltc.LTC.start_from_mlp`); ``mlp`` and ``avgpool`` copy it into their MLP;
            ``resampler`` and ``ldpv2`` are unaffected. Without such a projector (tiny, small, random
            weights) it does nothing.
    """

    kind: ProjectorKind = "ltc"
    rho: int = 2
    n_levels: int = 4
    use_local_context: bool = True
    refine: RefineMode = "multi"
    multi_include_last: bool = False
    local_blocks: int = 2
    heads: int = 8
    points: int = 4
    offset_scale: float = 1.0
    hidden: int | None = None
    ffn_ratio: float = 2.0
    resnet_ratio: float = 0.5
    window_pos_embed: bool = True
    num_queries: int | None = None
    resampler_layers: int = 1
    init_from_llava: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value."""
        check_choices(self, "projector")
        for name in ("rho", "heads", "points", "local_blocks", "resampler_layers"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"projector.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_levels < 0:
            raise ConfigError(f"projector.n_levels must be >= 0, got {self.n_levels}")
        if self.kind == "ltc" and self.refine == "multi" and self.n_levels < 1:
            raise ConfigError("projector.refine='multi' needs n_levels >= 1")
        if self.ffn_ratio < 0 or self.resnet_ratio <= 0:
            raise ConfigError("projector.ffn_ratio must be >= 0 and projector.resnet_ratio > 0")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"projector.hidden must be >= 1 or null, got {self.hidden}")
        if self.num_queries is not None and self.num_queries < 1:
            raise ConfigError(f"projector.num_queries must be >= 1 or null, got {self.num_queries}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProjectorConfig:
        return from_mapping(cls, data, "projector")


def pooled_side(grid: int, rho: int) -> int:
    """Side of the pooled grid: ``ceil(grid / rho)`` (every fine cell belongs to exactly one coarse cell)."""
    return -(-grid // rho)


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA-1.5's projector: Linear(C, D) - GELU - Linear(D, D)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def sincos_2d(coords: Tensor, dim: int) -> Tensor:
    """Fixed 2D sine-cosine embedding of ``[P, 2]`` (x, y) coordinates -> ``[P, dim]`` (dim % 4 == 0)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=coords.device) / quarter))
    parts = []
    for axis in (1, 0):  # y first, then x, as MAE / Qwen-VL
        angle = coords[:, axis : axis + 1].float() * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class Projector(nn.Module, metaclass=abc.ABCMeta):
    """Interface of every visual projector: ``forward(last, levels) -> [B, M, D]``."""

    @abc.abstractmethod
    def forward(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        """Map ``last [B, N, C]`` (and the earlier ``levels``) to ``[B, M, D]`` LLM tokens."""

    @abc.abstractmethod
    def num_output_tokens(self, grid: int) -> int:
        """M, the number of output tokens for a ``grid x grid`` input."""


class MLPProjector(Projector):
    """LLaVA-1.5's MLP (Linear-GELU-Linear) applied to all N tokens (Table V "MLP", 576 tokens)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp2x_gelu(in_dim, out_dim)

    def forward(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        grid_side(last.shape[1])
        return self.mlp(last)

    def num_output_tokens(self, grid: int) -> int:
        return grid * grid


class AvgPoolProjector(Projector):
    """2D average pooling by rho (adaptive, ``ceil(grid / rho)`` per side), then LLaVA's MLP.

    Pooling before the MLP (cheaper; both are linear up to the GELU) is OURS.
    """

    def __init__(self, in_dim: int, out_dim: int, rho: int) -> None:
        super().__init__()
        self.rho = rho
        self.mlp = mlp2x_gelu(in_dim, out_dim)

    def forward(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        side = grid_side(last.shape[1])
        pooled = F.adaptive_avg_pool2d(tokens_to_map(last, side), pooled_side(side, self.rho))
        return self.mlp(map_to_tokens(pooled))

    def num_output_tokens(self, grid: int) -> int:
        return pooled_side(grid, self.rho) ** 2


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention from queries to image tokens, then an optional feed-forward layer."""

    def __init__(self, dim: int, heads: int, ffn_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = int(dim * ffn_ratio)
        self.ffn = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            if hidden > 0
            else None
        )

    def forward(self, q: Tensor, q_pos: Tensor, kv: Tensor, kv_pos: Tensor) -> Tensor:
        qn, kvn = self.norm_q(q), self.norm_kv(kv)
        q = q + self.attn(qn + q_pos, kvn + kv_pos, kvn, need_weights=False)[0]
        return q + self.ffn(q) if self.ffn is not None else q


class ResamplerProjector(Projector):
    """Learned queries with cross-attention to the image tokens (Table V "Resampler"; Qwen-VL style).

    Works at the LLM width D: ``kv_proj`` maps C -> D, fixed 2D sin-cos positions are added to the keys and
    (when the query count is a square) to the queries in the same image frame, then ``layers`` x
    (cross-attention + FFN), LayerNorm and Linear(D, D).
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_queries: int, heads: int, layers: int, ffn_ratio: float
    ) -> None:
        super().__init__()
        if out_dim % heads != 0:
            raise ConfigError(f"resampler width {out_dim} is not divisible by heads {heads}")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.layers = nn.ModuleList(ResamplerLayer(out_dim, heads, ffn_ratio) for _ in range(layers))
        self.norm_out = nn.LayerNorm(out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        qside = math.isqrt(num_queries)
        self._qside = qside if qside * qside == num_queries else 0

    def _positions(self, side: int, device: torch.device) -> tuple[Tensor, Tensor]:
        dim = self.queries.shape[1]
        if not self._qside:
            zeros = torch.zeros(self.num_queries + side * side, dim, device=device)
            return zeros[: self.num_queries], zeros[self.num_queries :]
        q_pos = sincos_2d(grid_reference_points(self._qside, self._qside, device), dim)
        # Image-token centres in the query grid's frame: (i + 0.5) * qside / side - 0.5.
        k_coords = (grid_reference_points(side, side, device) + 0.5) * (self._qside / side) - 0.5
        return q_pos, sincos_2d(k_coords, dim)

    def forward(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        side = grid_side(last.shape[1])
        kv = self.kv_proj(last)
        q_pos, kv_pos = self._positions(side, last.device)
        q = self.queries.unsqueeze(0).expand(last.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, q_pos.to(kv.dtype), kv, kv_pos.to(kv.dtype))
        return self.proj(self.norm_out(q))

    def num_output_tokens(self, grid: int) -> int:
        return self.num_queries


class LDPv2Projector(Projector):
    """MobileVLM v2's LDP-v2: Linear-GELU-Linear on every token, 2D average pooling by rho, then a PEG
    (3x3 depthwise convolution with a residual) that re-injects position (Table V "LDP-v2")."""

    def __init__(self, in_dim: int, out_dim: int, rho: int) -> None:
        super().__init__()
        self.rho = rho
        self.mlp = mlp2x_gelu(in_dim, out_dim)
        self.peg = nn.Conv2d(out_dim, out_dim, 3, 1, 1, bias=True, groups=out_dim)

    def forward(self, last: Tensor, levels: Sequence[Tensor] = ()) -> Tensor:
        side = grid_side(last.shape[1])
        x = tokens_to_map(self.mlp(last), side)
        x = F.adaptive_avg_pool2d(x, pooled_side(side, self.rho))
        return map_to_tokens(self.peg(x) + x)

    def num_output_tokens(self, grid: int) -> int:
        return pooled_side(grid, self.rho) ** 2


def table_v_variants(base: ProjectorConfig | None = None) -> dict[str, ProjectorConfig]:
    """The projector rows of Table V (plus LTC without its Local-Context Learner), keyed by a short name."""
    b = base.to_dict() if base is not None else ProjectorConfig().to_dict()

    def make(**kw: Any) -> ProjectorConfig:
        return ProjectorConfig.from_dict({**b, **kw})

    return {
        "ltc-baseline": make(kind="ltc", refine="none", use_local_context=True),
        "ltc-injection": make(kind="ltc", refine="last", use_local_context=True),
        "ltc": make(kind="ltc", refine="multi", use_local_context=True),
        "ltc-no-local-context": make(kind="ltc", refine="multi", use_local_context=False),
        "mlp": make(kind="mlp"),
        "avgpool": make(kind="avgpool"),
        "resampler": make(kind="resampler"),
        "ldpv2": make(kind="ldpv2"),
    }

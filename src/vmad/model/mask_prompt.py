"""OURS: the predicted anomaly map fed back to the LLM as prompt embeddings after ``<seg>``.

The paper's answer is generated before and independently of the mask (Eq. 3-5). Here the mask M̄ of Eq. 5,
computed from the ``<seg>`` state, is summarised and turned into ``n_tokens`` LLM input embeddings that are
inserted right after ``<seg>``, so the text that follows (description, impact, suggestion) is conditioned on
where and how strongly the decoder sees an anomaly. The idea follows AnomalyGPT's prompt learner (localisation
result -> prompt embeddings); the summary features and the MLP are our own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.model.outputs import EncodedImages
from vmad.model.sequence import TokenSequence, first_index, splice

if TYPE_CHECKING:
    from vmad.model.vmad import VMADModel


def mask_summary(probs: Tensor, grid: int) -> Tensor:
    """``[K, H, W]`` probabilities -> ``[K, grid * grid + 3]``: the max-pooled ``grid x grid`` map (where),
    then the global max, mean and the fraction above 0.5 (how strong, how large)."""
    if probs.dim() != 3:
        raise ValueError(f"mask probabilities must be [K, H, W], got shape {tuple(probs.shape)}")
    p = probs.float()
    pooled = F.adaptive_max_pool2d(p[:, None], grid).flatten(1)
    flat = p.flatten(1)
    stats = torch.stack([flat.amax(1), flat.mean(1), (flat > 0.5).float().mean(1)], dim=1)
    return torch.cat([pooled, stats], dim=1)


class MaskPrompt(nn.Module):
    """Mask summary -> ``[K, n_tokens, llm_dim]`` embeddings: a learned base (init: the vocabulary's mean
    embedding) plus an MLP of :func:`mask_summary` (its last layer starts at zero: a fresh prompt is
    neutral)."""

    def __init__(
        self,
        llm_dim: int,
        n_tokens: int,
        grid: int = 8,
        hidden: int = 256,
        init_embedding: Tensor | None = None,
    ) -> None:
        super().__init__()
        if n_tokens < 1 or grid < 1:
            raise ValueError(f"n_tokens and grid must be >= 1, got {n_tokens} and {grid}")
        self.n_tokens, self.grid, self.llm_dim = n_tokens, grid, llm_dim
        base = torch.zeros(n_tokens, llm_dim)
        if init_embedding is not None:
            base = init_embedding.detach().float().reshape(1, llm_dim).expand(n_tokens, -1).clone()
        self.base = nn.Parameter(base)
        self.mlp = nn.Sequential(
            nn.Linear(grid * grid + 3, hidden), nn.GELU(), nn.Linear(hidden, n_tokens * llm_dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, probs: Tensor) -> Tensor:
        """``[K, H, W]`` mask probabilities (no gradient through them) -> ``[K, n_tokens, llm_dim]``."""
        feats = mask_summary(probs.detach(), self.grid).to(self.base.dtype)
        delta = self.mlp(feats).view(-1, self.n_tokens, self.llm_dim)
        return self.base[None] + delta


def insert_mask_prompt(model: VMADModel, encoded: EncodedImages, seq: TokenSequence) -> TokenSequence:
    """Mask from a no-grad LLM pass up to ``<seg>``, its prompt embeddings inserted after ``<seg>``.
    Samples without ``<seg>`` get the same number of masked padding positions at the end."""
    assert model.mask_prompt is not None
    seg_index, has = first_index(seq.ids, model.seg_token_id)
    prompts = seq.embeds.new_zeros(len(seq.ids), model.mask_prompt.n_tokens, seq.embeds.shape[-1])
    rows = torch.nonzero(has).flatten()
    if len(rows):
        end = int(seg_index[rows].max()) + 1
        head = TokenSequence(seq.embeds[:, :end], seq.ids[:, :end], seq.attention[:, :end])
        with torch.no_grad():
            hidden = model.run_llm(head.embeds, head.attention, head.position_ids())
            h_seg = hidden[rows, model.seg_positions(seq.ids)[rows]]
            probs = model.mask_probs(encoded.rows(rows), h_seg)
        prompts[rows] = model.mask_prompt(probs).to(prompts.dtype)
    at = [int(seg_index[b]) + 1 if bool(has[b]) else seq.ids.shape[1] for b in range(len(seq.ids))]
    return splice(seq, at, prompts, model.slot_token_id, has.tolist(), replace=False)

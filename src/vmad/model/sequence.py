"""Building the LLM's input sequence: embeddings, ids, attention mask and labels kept in step.

One operation, :func:`splice`, serves both places where VMAD changes a tokenised dialogue: the single
``<image>`` placeholder replaced by the M projector tokens (Eq. 2-3), and the OURS mask prompt inserted after
``<seg>``. Inserted positions carry a given id (``<image>`` or padding) and label -100, so later searches
(e.g. :func:`seg_positions`) run over the real layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vmad.model.chat_format import IGNORE_INDEX


@dataclass
class TokenSequence:
    """A batch of sequences: ``embeds [B, T, D]``, ``ids``/``attention`` ``[B, T]``, optional ``labels``."""

    embeds: Tensor
    ids: Tensor
    attention: Tensor
    labels: Tensor | None = None

    def position_ids(self) -> Tensor:
        """Positions that skip padding (left or right): ``cumsum(attention) - 1``, clamped at 0."""
        return (self.attention.cumsum(-1) - 1).clamp(min=0)


def splice(
    seq: TokenSequence,
    at: Sequence[int],
    insert: Tensor,
    insert_id: int,
    insert_attention: Sequence[bool],
    replace: bool,
) -> TokenSequence:
    """Insert ``insert [B, N, D]`` into sample b at index ``at[b]`` (replacing the token there when
    ``replace``); the new positions get id ``insert_id``, label -100 and attention ``insert_attention[b]``."""
    drop = 1 if replace else 0
    n = insert.shape[1]
    insert = insert.to(seq.embeds.dtype)
    embeds, ids, attention, labels = [], [], [], []
    for b, p in enumerate(at):
        on = 1 if insert_attention[b] else 0
        embeds.append(torch.cat([seq.embeds[b, :p], insert[b], seq.embeds[b, p + drop :]]))
        ids.append(torch.cat([seq.ids[b, :p], seq.ids.new_full((n,), insert_id), seq.ids[b, p + drop :]]))
        attention.append(
            torch.cat([seq.attention[b, :p], seq.attention.new_full((n,), on), seq.attention[b, p + drop :]])
        )
        if seq.labels is not None:
            lab = seq.labels
            labels.append(torch.cat([lab[b, :p], lab.new_full((n,), IGNORE_INDEX), lab[b, p + drop :]]))
    stacked = torch.stack(labels) if seq.labels is not None else None
    return TokenSequence(torch.stack(embeds), torch.stack(ids), torch.stack(attention), stacked)


def first_index(ids: Tensor, token_id: int) -> tuple[Tensor, Tensor]:
    """``(index of the first token_id per row (0 when absent), whether the row has one)``."""
    hit = ids == token_id
    return hit.to(torch.int64).argmax(1), hit.any(1)


def seg_positions(ids: Tensor, seg_token_id: int, before_seg: bool) -> Tensor:
    """Index of H̄_seg per sample in the spliced layout, -1 without ``<seg>``. OURS (``llm.seg_state``): the
    state at the first ``<seg>`` (``at_seg``) or the one predicting it (``before_seg``)."""
    first, has = first_index(ids, seg_token_id)
    if before_seg:
        first = first - 1
    return torch.where(has, first, torch.full_like(first, -1))

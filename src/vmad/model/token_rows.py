"""The trained rows of the tokens VMAD adds to a frozen vocabulary (``<seg>``, ``<image>``; Sec. III-B.1).

Only these rows learn: they are separate parameters that replace the frozen base rows on the way in
(:meth:`NewTokenRows.embed`) and the matching logit columns on the way out (:meth:`NewTokenRows.logits`), so
the base embedding matrices stay frozen (no weight-decay drift on the other rows). OURS: new rows start at
the mean of the original rows. For a tied head the input rows serve both ways.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class NewTokenRows(nn.Module):
    """Input rows ``embed [K, D]`` and, for an untied head, output rows ``out [K, D]`` of ``token_ids``."""

    def __init__(self, llm: nn.Module, token_ids: Sequence[int], base_rows: int) -> None:
        super().__init__()
        self.token_ids = [int(i) for i in token_ids]
        self.register_buffer("ids", torch.tensor(self.token_ids, dtype=torch.long), persistent=False)
        embedding = llm.get_input_embeddings().weight
        head = llm.get_output_embeddings()
        tied = head is None or head.weight is embedding
        with torch.no_grad():
            self.mean_input_row = embedding[:base_rows].float().mean(0)
            k = len(self.token_ids)
            self.embed = nn.Parameter(self.mean_input_row[None].expand(k, -1).clone())
            self.out = None
            if not tied:
                mean_out = head.weight[:base_rows].float().mean(0, keepdim=True)
                self.out = nn.Parameter(mean_out.expand(k, -1).clone())

    def embed_ids(self, base_embedding: nn.Module, ids: Tensor) -> Tensor:
        """Frozen base embedding of ``ids`` with the added tokens' rows taken from :attr:`embed`."""
        emb = base_embedding(ids)
        if not self.token_ids:
            return emb
        hit = ids[..., None] == self.ids
        rows = self.embed[hit.to(torch.int64).argmax(-1)].to(emb.dtype)
        return torch.where(hit.any(-1)[..., None], rows, emb)

    def logits(self, base_head: nn.Module, hidden: Tensor) -> Tensor:
        """Vocabulary logits of ``hidden``; the added tokens' columns use the trained rows."""
        out = base_head(hidden)
        if not self.token_ids:
            return out
        rows = self.out if self.out is not None else self.embed
        new = hidden @ rows.to(hidden.dtype).t()
        return out.index_copy(-1, self.ids, new.to(out.dtype))

    def write_into(self, llm: nn.Module) -> None:
        """Copy the trained rows into ``llm``'s own embedding (and untied head) matrices (for export)."""
        with torch.no_grad():
            embedding = llm.get_input_embeddings().weight
            embedding[self.ids] = self.embed.to(embedding.dtype)
            head = llm.get_output_embeddings()
            if head is not None and self.out is not None:
                head.weight[self.ids] = self.out.to(head.weight.dtype)

"""Typed results of :class:`~vmad.model.vmad.VMADModel` (what each pass hands to the next step)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class EncodedImages:
    """F_I then Ψ (Eq. 1-2): the input ``images [B, 3, H, W]``, the encoder's ``last [B, N, C]`` and earlier
    ``levels``, and the projector's ``visual_tokens [B, M, D]``; ``priors [B, 1, H', W']`` (OURS,
    :mod:`vmad.model.prior_prompt`): the normality prior over each image, all-NaN rows for none;
    ``embeddings [B, dim, h, w]``: f of Eq. 4 (backbone + neck) once computed at inference (no grad), so
    each image goes through the frozen backbone once (None: not computed yet)."""

    images: Tensor
    last: Tensor
    levels: list[Tensor]
    visual_tokens: Tensor
    priors: Tensor | None = None
    embeddings: Tensor | None = None

    def rows(self, index: Tensor) -> EncodedImages:
        """The samples ``index`` of the batch."""
        levels = [level[index] for level in self.levels]
        priors = None if self.priors is None else self.priors[index]
        embeddings = None if self.embeddings is None else self.embeddings[index]
        return EncodedImages(
            self.images[index], self.last[index], levels, self.visual_tokens[index], priors, embeddings
        )


@dataclass
class VMADOutput:
    """A teacher-forced pass over whole dialogues (:meth:`VMADModel.forward`): what the losses of Eq. 6-7 and
    17 need.

    ``answer_logits [K, V]`` / ``answer_targets [K]``: next-token logits and targets at the K supervised
    positions (L_txt); ``mask_logits [S, H, W]`` / ``mask_targets``: masks of the S samples ``mask_rows`` that
    have a segmentation answer (None when there is none); ``hidden_states [B, T, D]``, ``ids [B, T]`` and
    ``seg_positions [B]`` in the spliced layout; ``encoded``: the image side (DSSL reads it);
    ``verdict_logits [S]``: the ``<seg>`` verdict of the S samples ``mask_rows`` (OURS, None without a verdict
    head)."""

    answer_logits: Tensor
    answer_targets: Tensor
    mask_logits: Tensor | None
    mask_targets: Tensor | None
    mask_rows: Tensor
    hidden_states: Tensor
    ids: Tensor
    seg_positions: Tensor
    encoded: EncodedImages
    verdict_logits: Tensor | None = None


@dataclass
class SegmentationResult:
    """``probs``/``logits``: ``[B, H, W]`` at the input image size; ``scores``: ``[B]`` image scores;
    ``score_logits``: their log-odds (float64; unsaturated with ``model.score.space`` ``logit``)."""

    probs: Tensor
    logits: Tensor
    scores: Tensor
    score_logits: Tensor | None = None


@dataclass
class GenerationResult:
    """Greedy answers; ``probs[i]``/``scores[i]`` are None when answer i has no ``<seg>``; ``encoded``: the
    batch's encoded images (reused by ``VMADModel.segment(..., encoded=...)``, so no encoder runs twice)."""

    texts: list[str]
    token_ids: list[list[int]]
    probs: list[Tensor | None]
    scores: list[float | None]
    encoded: EncodedImages | None = None

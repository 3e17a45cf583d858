"""M_decoder of Eq. 5: SAM's prompt-able mask decoder, prompted by H_seg as one sparse prompt token, plus the
neck that maps a backbone's feature maps to its 256-d image embedding, and the mask losses of Eq. 7.

The decoder reuses ``transformers``' SAM modules (two-way transformer, upscaling, hypernetwork MLPs); the
image-wide positional encoding is SAM's random Fourier features. Dense prompt: SAM's "no mask" embedding,
plus (OURS, ``prior_prompt``) an encoded zero-shot normality prior (:mod:`vmad.model.prior_prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.model.config import MaskDecoderConfig
from vmad.model.layers import LayerNorm2d
from vmad.model.prior_prompt import PriorPrompt


class FeatureNeck(nn.Module):
    """Backbone maps (resampled to the first map's grid, concatenated) -> conv1x1 -> LN -> conv3x3 -> LN to
    ``dim`` channels, as SAM's image-encoder neck (trained; small preset: EfficientNet-Lite0 stride-16
    blocks)."""

    def __init__(self, in_channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(sum(in_channels), dim, 1, bias=False),
            LayerNorm2d(dim),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            LayerNorm2d(dim),
        )

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        size = maps[-1].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        return self.net(torch.cat(list(maps), dim=1))


class PromptedMaskDecoder(nn.Module):
    """SAM mask decoder with the positional encoding and the no-mask dense embedding it needs.

    ``forward(image_embeddings [B, dim, h, w], prompts [B, K, dim], prior [B, 1, S, S] | None) -> mask logits
    [B, 4h, 4w]`` (single-mask output, as LISA), plus the learned ``logit_bias`` (see ``MaskDecoderConfig``).
    ``prior`` (only with ``cfg.prior_prompt``): the normality prior over the input frame; rows that are all
    NaN have none and get the plain "no mask" embedding."""

    def __init__(
        self,
        cfg: MaskDecoderConfig,
        decoder: nn.Module | None = None,
        pos_embed: nn.Module | None = None,
        no_mask_embed: nn.Module | None = None,
    ) -> None:
        super().__init__()
        from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
        from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPositionalEmbedding

        if decoder is None:
            dcfg = SamMaskDecoderConfig(
                hidden_size=cfg.dim,
                mlp_dim=cfg.mlp_dim,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                iou_head_hidden_dim=cfg.dim,
            )
            dcfg._attn_implementation = "sdpa"
            decoder = SamMaskDecoder(dcfg)
        if pos_embed is None:  # SAM: random Gaussian Fourier features with scale 1
            pos_embed = SamPositionalEmbedding(SimpleNamespace(scale=1.0, num_pos_feats=cfg.dim // 2))
            pos_embed.positional_embedding.requires_grad_(False)
        self.decoder = decoder
        # Single-mask output (LISA): the IoU head and the multimask tokens' MLPs never reach a loss; frozen.
        for unused in (decoder.iou_prediction_head, *decoder.output_hypernetworks_mlps[1:]):
            unused.requires_grad_(False)
        self.pos_embed = pos_embed
        self.no_mask_embed = no_mask_embed if no_mask_embed is not None else nn.Embedding(1, cfg.dim)
        # shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim bf16 tensors
        self.logit_bias = nn.Parameter(torch.tensor([float(cfg.logit_bias)]))
        self.dim = cfg.dim
        self.mask_query = cfg.mask_query
        self.prior_prompt = (
            PriorPrompt(cfg.dim, cfg.prior_skip, cfg.prior_skip_init, cfg.prior_skip_offset)
            if cfg.prior_prompt else None
        )

    def dense_positional_encoding(self, h: int, w: int) -> Tensor:
        """``[1, dim, h, w]`` encoding of the cell centres."""
        ref = self.pos_embed.positional_embedding
        ys = (torch.arange(h, device=ref.device, dtype=ref.dtype) + 0.5) / h
        xs = (torch.arange(w, device=ref.device, dtype=ref.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, 2] as (x, y)
        return self.pos_embed(grid[None]).squeeze(0).permute(2, 0, 1)[None]

    def forward(self, image_embeddings: Tensor, prompts: Tensor, prior: Tensor | None = None) -> Tensor:
        b, _, h, w = image_embeddings.shape
        dtype = self.no_mask_embed.weight.dtype
        image_embeddings = image_embeddings.to(dtype)
        pe = self.dense_positional_encoding(h, w).to(dtype).expand(b, -1, -1, -1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        skip = None
        if prior is not None and self.prior_prompt is not None:
            present = ~torch.isnan(prior.flatten(1)).all(dim=1)
            prior = torch.nan_to_num(prior.float(), nan=0.0)
            keep = present.to(dtype).view(b, 1, 1, 1)
            dense = dense + keep * self.prior_prompt.dense(prior, (h, w)).to(dtype)
            skip = self.prior_prompt.skip(prior, (4 * h, 4 * w))  # [B, 4h, 4w], the logits' grid
            skip = None if skip is None else skip * keep[:, 0]
        if self.mask_query == "seg_state":
            masks = self._read_out_by_prompt(image_embeddings + dense, pe, prompts.to(dtype))
        else:
            masks, _ = self.decoder(
                image_embeddings=image_embeddings,
                image_positional_embeddings=pe,
                sparse_prompt_embeddings=prompts.to(dtype)[:, None],
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            masks = masks[:, 0]
        logits = masks + self.logit_bias.to(masks.dtype)  # [B, 1, 4h, 4w]
        return logits if skip is None else logits + skip[:, None].to(logits.dtype)

    def _read_out_by_prompt(self, image_embeddings: Tensor, pe: Tensor, prompts: Tensor) -> Tensor:
        """OURS (``mask_query: seg_state``): SAM's decoder pass with the H_seg prompt token's output, not the
        learned mask token's, fed to the (first) hypernetwork MLP: ``[B, 1, 4h, 4w]`` mask logits.
        ``prompts [B, K, dim]``; the IoU and mask tokens still take part in the two-way attention."""
        dec = self.decoder
        b, c, h, w = image_embeddings.shape
        learned = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([learned[None].expand(b, -1, -1), prompts], dim=1)[:, None]  # [B, 1, T, dim]
        tokens_out, embeddings = dec.transformer(
            point_embeddings=tokens, image_embeddings=image_embeddings, image_positional_embeddings=pe,
            attention_similarity=None,
        )
        query = tokens_out[:, 0, learned.shape[0]]  # the first prompt token: H_seg
        embeddings = embeddings.transpose(2, 3).reshape(b, c, h, w)
        up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(embeddings)))
        up = dec.activation(dec.upscale_conv2(up))  # [B, c/8, 4h, 4w]
        hyper = dec.output_hypernetworks_mlps[0](query)  # [B, c/8]
        return torch.einsum("bc,bchw->bhw", hyper, up)[:, None]


def dice_loss(logits: Tensor, target: Tensor, scale: float = 1000.0, eps: float = 1e-6) -> Tensor:
    """DICE of Eq. 7 per mask, averaged over the masks that have a defect (LISA's form: sums divided by
    ``scale``). OURS: a blank target (normal image) has no Dice overlap to learn — its Dice loss would stay
    ~1 whatever the prediction — so blank masks are left to the BCE term; with no non-blank mask the loss
    is 0 (with a graph). ``logits``/``target``: ``[K, H, W]``."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1).to(p.dtype)
    keep = t.sum(-1) > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    p, t = p[keep], t[keep]
    num = 2 * (p / scale * t).sum(-1)
    den = (p / scale).sum(-1) + (t / scale).sum(-1)
    return (1 - (num + eps) / (den + eps)).mean()


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel BCE of Eq. 7: mean over pixels, then over masks."""
    return (
        F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        .flatten(1)
        .mean(1)
        .mean()
    )

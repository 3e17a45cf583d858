"""VMADModel: frozen F_I -> Ψ -> Θ + LoRA + ``<seg>`` -> Γ -> M_decoder over V_backbone (Sec. III-B, Eq. 1-7).

Token layout: each sample's prompt holds exactly one ``<image>`` placeholder; its embedding is replaced by the
M projector tokens (``_splice``), and the ``<seg>`` position is searched in the ids *after* that splice, so it
follows the real number of visual tokens. OURS (``llm.seg_state``): H̄_seg is the last-layer hidden state at
the first ``<seg>`` of a sample (default ``at_seg``; ``before_seg`` takes the state predicting it), the same
rule in ``forward``, ``segment`` and ``generate``. One mask per sample.

Added tokens: only their rows are trained, as separate parameters (``new_token_embed`` and, for untied heads,
``new_token_out``) that replace the frozen base rows on the way in and the matching logits on the way out;
the base embedding matrices stay frozen (no weight decay drift on other rows).

OURS, optional (``llm.mask_prompt_tokens`` > 0): the mask predicted from H̄_seg becomes prompt embeddings
inserted right after ``<seg>`` (:mod:`vmad.model.mask_prompt`). Teacher-forced passes run the LLM twice: once
without gradient up to ``<seg>`` for the mask, once over the full sequence with the prompt inserted.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.errors import VMADError
from vmad.model.config import ScoreConfig, VMADConfig
from vmad.model.llm import IGNORE_INDEX, PromptLayout, add_vmad_tokens, tokenize_dialogues
from vmad.model.mask_decoder import bce_loss, dice_loss
from vmad.model.mask_prompt import MaskPrompt
from vmad.model.vision import tokens_to_maps
from vmad.tensor_io import save_safetensors

TRAINABLE_FORMAT = "vmad-trainable"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
OWNED_PREFIXES = (
    "projector.",
    "seg_head.",
    "mask_decoder.",
    "neck.",
    "aux_modules.",
    "new_token_",
    "mask_prompt.",
)


@dataclass
class SegmentationResult:
    """``probs``/``logits``: ``[B, H, W]`` at the input image size; ``scores``: ``[B]`` image scores."""

    probs: Tensor
    logits: Tensor
    scores: Tensor


@dataclass
class GenerationResult:
    """Greedy answers; ``probs[i]``/``scores[i]`` are None when answer i has no ``<seg>``."""

    texts: list[str]
    token_ids: list[list[int]]
    probs: list[Tensor | None]
    scores: list[float | None]


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps (reflect padding, radius 4 sigma)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(4 * sigma)))
    r = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    y = x[:, None]
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    kh = k[radius - pad_h : radius + pad_h + 1]
    kw = k[radius - pad_w : radius + pad_w + 1]
    y = F.conv2d(F.pad(y, (0, 0, pad_h, pad_h), mode="reflect"), (kh / kh.sum()).view(1, 1, -1, 1))
    y = F.conv2d(F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect"), (kw / kw.sum()).view(1, 1, 1, -1))
    return y[:, 0]


def image_scores(probs: Tensor, cfg: ScoreConfig) -> Tensor:
    """Image-level score from ``[B, H, W]`` mask probabilities by ``cfg.rule`` (OURS, see ScoreConfig)."""
    if cfg.rule == "max":
        return probs.flatten(1).amax(1)
    if cfg.rule == "mean_topk":
        flat = probs.flatten(1)
        k = max(1, int(round(cfg.topk_ratio * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    return gaussian_blur(probs.float(), cfg.sigma).flatten(1).amax(1)


def count_parameters(module: nn.Module | None, seen: set[int] | None = None) -> tuple[int, int]:
    """(parameters, trainable) of ``module``, each parameter counted once (tied weights, shared modules)."""
    if module is None:
        return 0, 0
    total = trainable = 0
    for p in module.parameters():
        if seen is not None:
            if id(p) in seen:
                continue
            seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


class VMADModel(nn.Module):
    """The VMAD model. Build it with :func:`vmad.model.build.build_vmad`.

    Batches for :meth:`forward` (see :meth:`prepare_batch`): ``images`` ``[B, 3, H, W]`` in [0, 1],
    ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (one ``<image>`` per sample, labels -100 on the
    prompt), ``masks`` ``[B, H, W]`` in {0, 1} and ``has_mask`` ``[B]`` bool (samples with a seg answer).
    """

    def __init__(
        self,
        config: VMADConfig,
        vision_encoder: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        tokenizer: Any,
        seg_head: nn.Module,
        visual_backbone: nn.Module | None,
        neck: nn.Module | None,
        mask_decoder: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision_encoder = vision_encoder
        self.projector = projector
        self.seg_head = seg_head
        self.visual_backbone = visual_backbone
        self.neck = neck
        self.mask_decoder = mask_decoder
        self.aux_modules = nn.ModuleDict()
        lcfg = config.llm
        self.layout = PromptLayout(lcfg.template, lcfg.system_prompt, lcfg.image_token)

        for p in llm.parameters():
            p.requires_grad_(False)
        self.new_token_ids_list = add_vmad_tokens(llm, tokenizer, [lcfg.seg_token, lcfg.image_token])
        self.new_tokens = [tokenizer.convert_ids_to_tokens(i) for i in self.new_token_ids_list]
        self.seg_token_id = int(tokenizer.convert_tokens_to_ids(lcfg.seg_token))
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(lcfg.image_token))
        self.register_buffer(
            "new_token_ids", torch.tensor(self.new_token_ids_list, dtype=torch.long), persistent=False
        )
        emb_w = llm.get_input_embeddings().weight
        out_layer = llm.get_output_embeddings()
        tied = out_layer is None or out_layer.weight is emb_w
        ids = self.new_token_ids.to(emb_w.device)
        with torch.no_grad():  # OURS: new rows start at the mean of the original rows
            n_orig = min(emb_w.shape[0], len(tokenizer) - len(ids))
            mean_in = emb_w[:n_orig].float().mean(0, keepdim=True)
            self.new_token_embed = nn.Parameter(mean_in.expand(len(ids), -1).clone())
            self.new_token_out = None
            if not tied:
                mean_out = out_layer.weight[:n_orig].float().mean(0, keepdim=True)
                self.new_token_out = nn.Parameter(mean_out.expand(len(ids), -1).clone())
        self.mask_prompt: MaskPrompt | None = None
        if lcfg.mask_prompt_tokens:
            self.mask_prompt = MaskPrompt(
                emb_w.shape[1], lcfg.mask_prompt_tokens, lcfg.mask_prompt_grid, init_embedding=mean_in[0]
            ).to(emb_w.device)
        pad = tokenizer.pad_token_id
        self.slot_token_id = int(pad) if pad is not None else 0  # id shown at mask-prompt positions
        if config.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=list(config.lora.target_modules),
                bias="none",
            )
            with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                llm = get_peft_model(llm, lora)
        self.llm = llm

    # ----------------------------------------------------------------- parts
    def base_lm(self) -> nn.Module:
        """The causal LM under the LoRA wrapper (LoRA layers are injected in place)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def device(self) -> torch.device:
        return self.new_token_embed.device

    def train(self, mode: bool = True) -> VMADModel:
        super().train(mode)
        for frozen in (self.vision_encoder, self.visual_backbone):
            if frozen is not None:
                frozen.eval()
        return self

    def attach_aux(self, name: str, module: nn.Module) -> None:
        """Register an auxiliary-loss module (DSSL hook): called in every :meth:`forward` with the context
        dict; it returns ``{"loss_<name>": tensor}``, weighted by ``config.loss.weight(name)``; its parameters
        are saved by :meth:`save_trainable`."""
        self.aux_modules[name] = module

    # ----------------------------------------------------------------- tokens
    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Frozen base embedding with the added tokens' rows taken from ``new_token_embed``."""
        emb = self.base_lm().get_input_embeddings()(ids)
        if len(self.new_token_ids_list) == 0:
            return emb
        hit = ids[..., None] == self.new_token_ids
        any_hit = hit.any(-1)
        rows = self.new_token_embed[hit.to(torch.int64).argmax(-1)].to(emb.dtype)
        return torch.where(any_hit[..., None], rows, emb)

    def logits(self, h: Tensor) -> Tensor:
        """Vocabulary logits; the added tokens' columns use the trained rows."""
        out = self.base_lm().get_output_embeddings()(h)
        if len(self.new_token_ids_list) == 0:
            return out
        rows = self.new_token_out if self.new_token_out is not None else self.new_token_embed
        new = h @ rows.to(h.dtype).t()
        return out.index_copy(-1, self.new_token_ids, new.to(out.dtype))

    def prepare_batch(
        self,
        images: Tensor,
        questions: Sequence[str],
        answers: Sequence[str | None] | None = None,
        masks: Tensor | None = None,
        padding_side: str = "right",
    ) -> dict[str, Tensor]:
        """A :meth:`forward` batch from raw parts (``has_mask``: the answer contains ``<seg>``)."""
        enc = tokenize_dialogues(self.tokenizer, self.layout, questions, answers, padding_side)
        batch = {"images": images, **enc}
        has = [a is not None and self.config.llm.seg_token in a for a in (answers or [None] * len(questions))]
        batch["has_mask"] = torch.tensor(has, dtype=torch.bool)
        if masks is not None:
            batch["masks"] = masks
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    # ----------------------------------------------------------------- core
    def encode_images(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """F_I (frozen, no grad) then Ψ: ``(last, levels, visual_tokens [B, M, D])`` (Eq. 1-2)."""
        with torch.no_grad():
            last, levels = self.vision_encoder(images)
        n = self.config.projector.n_levels
        tokens = self.projector(last.float(), [lv.float() for lv in levels[len(levels) - n :]] if n else [])
        return last, levels, tokens

    def _splice(
        self, ids: Tensor, attn: Tensor, labels: Tensor | None, vis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Replace each sample's single ``<image>`` id by the M visual tokens. Returns
        ``(inputs_embeds, expanded_ids, attention_mask, labels)`` in the real layout (image positions carry
        the ``<image>`` id, label -100)."""
        is_img = ids == self.image_token_id
        if not bool((is_img.sum(1) == 1).all()):
            raise VMADError(f"every prompt needs exactly one {self.config.llm.image_token} token")
        where = is_img.to(torch.int64).argmax(1).tolist()
        emb = self.embed_tokens(ids)
        vis = vis.to(emb.dtype)
        m = vis.shape[1]
        e_out, i_out, a_out, l_out = [], [], [], []
        for b, p in enumerate(where):
            e_out.append(torch.cat([emb[b, :p], vis[b], emb[b, p + 1 :]]))
            i_out.append(torch.cat([ids[b, :p], ids.new_full((m,), self.image_token_id), ids[b, p + 1 :]]))
            a_out.append(torch.cat([attn[b, :p], attn.new_ones(m), attn[b, p + 1 :]]))
            if labels is not None:
                l_out.append(
                    torch.cat([labels[b, :p], labels.new_full((m,), IGNORE_INDEX), labels[b, p + 1 :]])
                )
        lab = torch.stack(l_out) if labels is not None else None
        return torch.stack(e_out), torch.stack(i_out), torch.stack(a_out), lab

    def _run_llm(self, embeds: Tensor, attn: Tensor, position_ids: Tensor, cache: Any = None) -> Tensor:
        """Last-layer (normed) hidden states; ``cache`` (a KV cache object, updated in place) for decoding."""
        decoder = self.base_lm().model
        kwargs: dict[str, Any] = {}
        if cache is not None:
            name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
            kwargs = {name: cache, "use_cache": True}
        out = decoder(inputs_embeds=embeds, attention_mask=attn, position_ids=position_ids, **kwargs)
        return out.last_hidden_state

    def new_cache(self) -> Any:
        """An empty KV cache for :meth:`generate`."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.base_lm().config)
        except TypeError:  # older transformers
            return DynamicCache()

    def seg_positions(self, expanded_ids: Tensor) -> Tensor:
        """Index of H̄_seg per sample in the spliced layout (-1 when the sample has no ``<seg>``)."""
        hit = expanded_ids == self.seg_token_id
        first = hit.to(torch.int64).argmax(1)
        if self.config.llm.seg_state == "before_seg":
            first = first - 1
        return torch.where(hit.any(1), first, torch.full_like(first, -1))

    def backbone_maps(self, images: Tensor, last: Tensor, levels: Sequence[Tensor]) -> list[Tensor]:
        """The frozen V_backbone feature maps ``[B, C_i, h, w]`` (or the shared encoder's tokens as maps),
        before the neck; also f of DSSL (Eq. 8-9)."""
        if self.visual_backbone is None:
            return tokens_to_maps(last.float(), [lv.float() for lv in levels], self.vision_encoder.grid)
        with torch.no_grad():
            return self.visual_backbone(images)

    def image_embeddings(self, images: Tensor, last: Tensor, levels: Sequence[Tensor]) -> Tensor:
        """f of Eq. 4 (frozen backbone, or the shared encoder maps) through the trained neck:
        ``[B, 256, h, w]``."""
        maps = self.backbone_maps(images, last, levels)
        if self.neck is None:
            return maps[-1].float()
        return self.neck([m.float() for m in maps])

    def mask_logits(
        self, images: Tensor, last: Tensor, levels: Sequence[Tensor], h_seg: Tensor, size: tuple[int, int]
    ) -> Tensor:
        """Eq. 4-5: H_seg = Γ(H̄_seg); M̄ = M_decoder(H_seg, f), upsampled to ``size``: ``[K, H, W]`` logits."""
        prompts = self.seg_head(h_seg.float())[:, None]
        low = self.mask_decoder(self.image_embeddings(images, last, levels), prompts)
        return F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)[:, 0]

    def _mask_probs(
        self, rows: Tensor, images: Tensor, last: Tensor, levels: Sequence[Tensor], h_seg: Tensor
    ) -> Tensor:
        """Mask probabilities at the input size for the samples ``rows`` of a batch, from their H̄_seg."""
        lv = [level[rows] for level in levels]
        return self.mask_logits(images[rows], last[rows], lv, h_seg, tuple(images.shape[-2:])).sigmoid()

    def _teacher_forced(
        self, images: Tensor, ids: Tensor, attn: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Encode, splice, insert the mask prompt (when on) and run the LLM over whole dialogues:
        ``(last, levels, visual_tokens, hidden_states, expanded_ids, attention_mask, labels)``."""
        last, levels, vis = self.encode_images(images)
        embeds, xids, xattn, xlabels = self._splice(ids, attn, labels, vis)
        if self.mask_prompt is not None:
            embeds, xids, xattn, xlabels = self._insert_mask_prompt(
                images, last, levels, embeds, xids, xattn, xlabels
            )
        h = self._run_llm(embeds, xattn, (xattn.cumsum(-1) - 1).clamp(min=0))
        return last, levels, vis, h, xids, xattn, xlabels

    def _insert_mask_prompt(
        self,
        images: Tensor,
        last: Tensor,
        levels: Sequence[Tensor],
        embeds: Tensor,
        xids: Tensor,
        xattn: Tensor,
        xlabels: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Mask from a no-grad LLM pass up to ``<seg>``, its prompt embeddings inserted after ``<seg>``
        (label -100). Samples without ``<seg>`` get the same number of masked padding positions at the end."""
        assert self.mask_prompt is not None
        hit = xids == self.seg_token_id
        has = hit.any(1)
        seg_idx = hit.to(torch.int64).argmax(1)
        n_tok = self.mask_prompt.n_tokens
        prompts = embeds.new_zeros(len(xids), n_tok, embeds.shape[-1])
        sel = torch.nonzero(has).flatten()
        if len(sel):
            end = int(seg_idx[sel].max()) + 1
            with torch.no_grad():
                a = xattn[:, :end]
                h = self._run_llm(embeds[:, :end], a, (a.cumsum(-1) - 1).clamp(min=0))
                probs = self._mask_probs(sel, images, last, levels, h[sel, self.seg_positions(xids)[sel]])
            prompts[sel] = self.mask_prompt(probs).to(embeds.dtype)
        e_out, i_out, a_out, l_out = [], [], [], []
        for b in range(len(xids)):
            cut = int(seg_idx[b]) + 1 if bool(has[b]) else xids.shape[1]
            slot_attn = xattn.new_full((n_tok,), 1 if bool(has[b]) else 0)
            e_out.append(torch.cat([embeds[b, :cut], prompts[b], embeds[b, cut:]]))
            slot_ids = xids.new_full((n_tok,), self.slot_token_id)
            i_out.append(torch.cat([xids[b, :cut], slot_ids, xids[b, cut:]]))
            a_out.append(torch.cat([xattn[b, :cut], slot_attn, xattn[b, cut:]]))
            if xlabels is not None:
                slot_lab = xlabels.new_full((n_tok,), IGNORE_INDEX)
                l_out.append(torch.cat([xlabels[b, :cut], slot_lab, xlabels[b, cut:]]))
        lab = torch.stack(l_out) if xlabels is not None else None
        return torch.stack(e_out), torch.stack(i_out), torch.stack(a_out), lab

    def _text_loss(self, h: Tensor, labels: Tensor) -> Tensor:
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        if not bool(keep.any()):
            return h.sum() * 0.0
        logits = self.logits(h[:, :-1][keep])
        return F.cross_entropy(logits.float(), target[keep])

    def forward(
        self, batch: Mapping[str, Any], aux_losses: Iterable[nn.Module] | None = None
    ) -> dict[str, Any]:
        """Training losses: ``loss_txt``, ``loss_bce``, ``loss_dice`` and ``loss`` = λ_txt L_txt +
        λ_seg (λ_bce BCE + λ_dice DICE) (+ weighted auxiliary losses) (Eq. 6-7). Samples without a seg answer
        contribute no mask loss."""
        images = batch["images"].to(self.device)
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        last, levels, vis, h, xids, xattn, xlabels = self._teacher_forced(images, ids, attn, labels)
        loss_txt = self._text_loss(h, xlabels)

        seg_pos = self.seg_positions(xids)
        has_mask = batch.get("has_mask")
        has_mask = (seg_pos >= 0) if has_mask is None else has_mask.to(self.device).bool()
        if bool((has_mask & (seg_pos < 0)).any()):
            raise VMADError("a sample marked has_mask has no <seg> token in its answer")
        sel = torch.nonzero(has_mask).flatten()
        out: dict[str, Any] = {"seg_positions": seg_pos}
        if len(sel):
            if batch.get("masks") is None:
                raise VMADError("the batch has segmentation answers but no 'masks'")
            masks = batch["masks"].to(self.device)[sel]
            logits = self.mask_logits(
                images[sel],
                last[sel],
                [lv[sel] for lv in levels],
                h[sel, seg_pos[sel]],
                tuple(masks.shape[-2:]),
            )
            loss_bce, loss_dice = bce_loss(logits, masks), dice_loss(logits, masks)
            out["mask_logits"] = logits
            out["n_dice_masks"] = int((masks.flatten(1) > 0).any(1).sum())
        else:
            loss_bce = loss_dice = sum(p.sum() for p in self.seg_head.parameters()) * 0.0
        lw = self.config.loss
        loss = lw.txt * loss_txt + lw.seg * (lw.bce * loss_bce + lw.dice * loss_dice)
        out.update(loss_txt=loss_txt, loss_bce=loss_bce, loss_dice=loss_dice)
        context = {
            "model": self,
            "batch": batch,
            "images": images,
            "vision_last": last,
            "vision_levels": levels,
            "visual_tokens": vis,
            "hidden_states": h,
            "expanded_ids": xids,
            "attention_mask": xattn,
        }
        for module in [*self.aux_modules.values(), *(aux_losses or [])]:
            for name, value in module(context).items():
                out[name] = value
                loss = loss + self.config.loss.weight(name.removeprefix("loss_")) * value
        out["loss"] = loss
        return out

    # ----------------------------------------------------------------- inference
    @staticmethod
    def _as_batch(images: Tensor) -> Tensor:
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise VMADError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        return images

    @torch.no_grad()
    def segment(self, images: Tensor, question: str | Sequence[str]) -> SegmentationResult:
        """Fast path: ONE teacher-forced forward with the segmentation-only answer (``llm.seg_answer``,
        "It is <seg>."), then the mask at the input size and the image score. Call ``eval()`` first."""
        images = self._as_batch(images).to(self.device)
        n = images.shape[0]
        questions = [question] * n if isinstance(question, str) else list(question)
        enc = tokenize_dialogues(self.tokenizer, self.layout, questions, [self.config.llm.seg_answer] * n)
        ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        last, levels, vis = self.encode_images(images)
        embeds, xids, xattn, _ = self._splice(ids, attn, None, vis)
        h = self._run_llm(embeds, xattn, (xattn.cumsum(-1) - 1).clamp(min=0))
        pos = self.seg_positions(xids)
        rows = torch.arange(n, device=self.device)
        logits = self.mask_logits(images, last, levels, h[rows, pos], tuple(images.shape[-2:]))
        probs = logits.sigmoid()
        return SegmentationResult(probs=probs, logits=logits, scores=image_scores(probs, self.config.score))

    @torch.no_grad()
    def generate(
        self, images: Tensor, question: str | Sequence[str], max_new_tokens: int = 64
    ) -> GenerationResult:
        """Greedy text answer (KV cache); when the answer contains ``<seg>``, the mask from its hidden state
        (rule ``llm.seg_state``). Call ``eval()`` first."""
        images = self._as_batch(images).to(self.device)
        n = images.shape[0]
        questions = [question] * n if isinstance(question, str) else list(question)
        enc = tokenize_dialogues(self.tokenizer, self.layout, questions, None, padding_side="left")
        ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        last, levels, vis = self.encode_images(images)
        embeds, _, xattn, _ = self._splice(ids, attn, None, vis)
        pos = (xattn.cumsum(-1) - 1).clamp(min=0)
        cache = self.new_cache()
        h = self._run_llm(embeds, xattn, pos, cache)
        h_last, next_pos = h[:, -1], pos[:, -1] + 1
        stop = {
            i
            for i in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
            if isinstance(i, int) and i != self.tokenizer.unk_token_id
        }
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        seg_h: list[Tensor | None] = [None] * n
        generated: list[list[int]] = [[] for _ in range(n)]
        probs: list[Tensor | None] = [None] * n
        at_seg = self.config.llm.seg_state == "at_seg"
        for _ in range(max_new_tokens):
            nxt = self.logits(h_last).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            is_seg = (nxt == self.seg_token_id) & ~done
            for b in range(n):
                if not done[b]:
                    generated[b].append(int(nxt[b]))
                if is_seg[b] and seg_h[b] is None and not at_seg:
                    seg_h[b] = h_last[b]
            done = done | torch.tensor([int(t) in stop for t in nxt.tolist()], device=self.device)
            need = any(bool(is_seg[b]) and seg_h[b] is None for b in range(n))
            if bool(done.all()) and not need:
                break
            xattn = torch.cat([xattn, (~done | is_seg).to(xattn.dtype)[:, None]], dim=1)
            h_new = self._run_llm(self.embed_tokens(nxt[:, None]), xattn, next_pos[:, None], cache)
            h_last, next_pos = h_new[:, -1], next_pos + 1
            for b in range(n):
                if is_seg[b] and seg_h[b] is None:
                    seg_h[b] = h_last[b]
            fresh = [b for b in range(n) if bool(is_seg[b]) and probs[b] is None]
            if fresh and self.mask_prompt is not None:  # the mask, then its prompt, right after <seg>
                h_last, next_pos, xattn = self._feed_mask_prompt(
                    fresh, seg_h, probs, images, last, levels, h_last, next_pos, xattn, cache
                )
            if bool(done.all()):
                break
        texts = [self._decode(g, stop) for g in generated]
        scores: list[float | None] = [None] * n
        idx = [b for b in range(n) if seg_h[b] is not None and probs[b] is None]  # mask prompt off
        if idx:
            sel = torch.tensor(idx, device=self.device)
            p = self._mask_probs(sel, images, last, levels, torch.stack([seg_h[b] for b in idx]))  # type: ignore[misc]
            for j, b in enumerate(idx):
                probs[b] = p[j]
        for b in range(n):
            if probs[b] is not None:
                scores[b] = float(image_scores(probs[b][None], self.config.score)[0])
        return GenerationResult(texts=texts, token_ids=generated, probs=probs, scores=scores)

    def _feed_mask_prompt(
        self,
        fresh: list[int],
        seg_h: list[Tensor | None],
        probs: list[Tensor | None],
        images: Tensor,
        last: Tensor,
        levels: Sequence[Tensor],
        h_last: Tensor,
        next_pos: Tensor,
        xattn: Tensor,
        cache: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decoding step after ``<seg>`` (mask prompt on): the masks of the samples in ``fresh`` (stored in
        ``probs``), then their prompt embeddings through the LLM (the other samples' slots are masked out).
        Returns the updated ``(h_last, next_pos, attention_mask)``."""
        assert self.mask_prompt is not None
        sel = torch.tensor(fresh, device=self.device)
        p = self._mask_probs(sel, images, last, levels, torch.stack([seg_h[b] for b in fresh]))  # type: ignore[misc]
        for j, b in enumerate(fresh):
            probs[b] = p[j]
        n_tok, n = self.mask_prompt.n_tokens, len(h_last)
        emb = h_last.new_zeros(n, n_tok, h_last.shape[-1])
        emb[sel] = self.mask_prompt(p).to(emb.dtype)
        on = torch.zeros(n, dtype=torch.bool, device=self.device)
        on[sel] = True
        xattn = torch.cat([xattn, on.to(xattn.dtype)[:, None].expand(n, n_tok)], dim=1)
        pos = next_pos[:, None] + torch.arange(n_tok, device=self.device)
        h = self._run_llm(emb, xattn, pos, cache)
        h_last = torch.where(on[:, None], h[:, -1], h_last)
        return h_last, torch.where(on, next_pos + n_tok, next_pos), xattn

    @torch.no_grad()
    def answer_logprobs(
        self, images: Tensor, question: str | Sequence[str], answer: str | Sequence[str], after: str = ""
    ) -> Tensor:
        """Teacher-forced log-likelihood of ``answer`` per image (the text term of Eq. 6 as a sum): log p of
        the answer's tokens and its end token given the image and question, ``[B]``. ``after``: a start of
        every answer (e.g. ``"It is <seg>."``) whose tokens are conditioned on but not counted, so the result
        is log p(rest | image, question, after). Call ``eval()`` first."""
        images = self._as_batch(images).to(self.device)
        n = images.shape[0]
        questions = [question] * n if isinstance(question, str) else list(question)
        answers = [answer] * n if isinstance(answer, str) else list(answer)
        skip = 0
        if after:
            head = self.tokenizer(self.layout.answer(after, ""), add_special_tokens=False)["input_ids"]
            for a in answers:
                ids_a = self.tokenizer(self.layout.answer(a, ""), add_special_tokens=False)["input_ids"]
                if list(ids_a[: len(head)]) != list(head):
                    raise VMADError(f"answer {a!r} does not start with the tokens of {after!r}")
            skip = len(head)
        enc = tokenize_dialogues(self.tokenizer, self.layout, questions, answers)
        ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        *_, h, _, _, xlabels = self._teacher_forced(images, ids, attn, enc["labels"].to(self.device))
        assert xlabels is not None
        target = xlabels[:, 1:]
        keep = target != IGNORE_INDEX
        logp = self.logits(h[:, :-1]).float().log_softmax(-1)
        token_lp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        counted = keep & (keep.cumsum(-1) > skip)
        return (token_lp * counted).sum(-1)

    def _decode(self, ids: list[int], stop: set[int]) -> str:
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=False).strip()

    # ----------------------------------------------------------------- save / load
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what VMAD trains: LoRA weights, projector, Γ, neck, decoder, new token rows, aux heads
        (whole modules, buffers included)."""
        trained_llm = {f"llm.{n}" for n, p in self.llm.named_parameters() if p.requires_grad or "lora_" in n}
        return {
            k: v for k, v in self.state_dict().items() if k.startswith(OWNED_PREFIXES) or k in trained_llm
        }

    def save_trainable(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` (trained parts) and ``config.json`` to folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(folder / WEIGHTS_NAME, self.trainable_state_dict(), metadata={"format": "pt"})
        meta = {
            "format": TRAINABLE_FORMAT,
            "version": 1,
            "new_tokens": self.new_tokens,
            "new_token_ids": self.new_token_ids_list,
            "aux_modules": list(self.aux_modules),
            "config": self.config.to_dict(),
        }
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return folder

    def load_trainable(self, path: str | Path, keep_fresh: Sequence[str] = ()) -> list[str]:
        """Load :meth:`save_trainable`'s weights onto this (freshly built) model; every trained key must
        match, except the weights of auxiliary training modules that this model has not attached, and keys
        under a ``keep_fresh`` prefix (e.g. ``"mask_prompt."`` when fine-tuning a model without one), which
        may be absent and then keep their initial values. Returns those absent keys."""
        from safetensors.torch import load_file

        folder = Path(path)
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if meta.get("new_token_ids") != self.new_token_ids_list:
            raise VMADError(
                f"{folder}: added token ids {meta.get('new_token_ids')} differ from this base model's "
                f"{self.new_token_ids_list}"
            )
        state = load_file(str(folder / WEIGHTS_NAME), device=str(self.device))
        own = self.trainable_state_dict()
        expected = set(own)
        # Training-only auxiliary modules (DSSL heads) that are not attached to this model are not needed
        # for inference: their weights are skipped; attached ones must match exactly like everything else.
        attached = tuple(f"aux_modules.{name}." for name in self.aux_modules)
        state = {k: v for k, v in state.items() if not k.startswith("aux_modules.") or k.startswith(attached)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        fresh = [k for k in missing if keep_fresh and k.startswith(tuple(keep_fresh))]
        missing = [k for k in missing if k not in fresh]
        if missing or unexpected:
            raise VMADError(
                f"{folder}: checkpoint does not match the model (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        wrong = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if v.shape != own[k].shape
        ]
        if wrong:
            raise VMADError(f"{folder}: checkpoint shapes differ from the model's ({'; '.join(wrong[:3])})")
        self.load_state_dict(state, strict=False)
        return fresh

    @classmethod
    def from_pretrained(cls, path: str | Path, **build_kwargs: Any) -> VMADModel:
        """Rebuild the base from the saved config (``build_kwargs`` go to ``build_vmad``, e.g. local paths)
        and load the trained parts."""
        from vmad.model.build import build_vmad

        folder = Path(path)
        if not (folder / CONFIG_NAME).is_file():
            raise VMADError(f"{folder}: no {CONFIG_NAME} (not a VMAD checkpoint folder)")
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if meta.get("format") != TRAINABLE_FORMAT:
            raise VMADError(f"{folder}: {CONFIG_NAME} is not a {TRAINABLE_FORMAT} file")
        model = build_vmad(VMADConfig.from_dict(meta["config"]), **build_kwargs)
        model.load_trainable(folder)
        return model

    def merge_lora(self) -> nn.Module:
        """Fold LoRA into the base weights and write the trained token rows into the base embedding/head
        (outputs unchanged); returns the plain causal LM, ready for ``save_pretrained``."""
        if hasattr(self.llm, "merge_and_unload"):
            self.llm = self.llm.merge_and_unload()
        base = self.base_lm()
        with torch.no_grad():
            emb = base.get_input_embeddings().weight
            emb[self.new_token_ids] = self.new_token_embed.to(emb.dtype)
            head = base.get_output_embeddings()
            if head is not None and self.new_token_out is not None:
                head.weight[self.new_token_ids] = self.new_token_out.to(head.weight.dtype)
        return base

    # ----------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """Parameter counts per component (each parameter counted once overall) and the visual-token count."""
        seen: set[int] = set()
        comps: dict[str, dict[str, Any]] = {}
        parts = [
            ("vision_encoder", self.vision_encoder),
            ("projector", self.projector),
            ("llm", nn.ModuleList([self.llm]).append(_ParamHolder(self.new_token_embed, self.new_token_out))),
            ("seg_head", self.seg_head),
            ("visual_backbone", self.visual_backbone),
            ("mask_decoder", nn.ModuleList([m for m in (self.neck, self.mask_decoder) if m is not None])),
        ]
        if self.mask_prompt is not None:
            parts.append(("mask_prompt", self.mask_prompt))
        for name, module in parts:
            total, trainable = count_parameters(module)
            count_parameters(module, seen)
            comps[name] = {"parameters": total, "trainable": trainable}
        if self.visual_backbone is None:
            comps["visual_backbone"] = {
                **comps["vision_encoder"],
                "trainable": 0,
                "shared_with": "vision_encoder",
            }
        total, trainable = count_parameters(self)
        grid = self.vision_encoder.grid
        return {
            "preset": self.config.preset,
            "visual_tokens": int(self.projector.num_output_tokens(grid)),
            "encoder_tokens": grid * grid,
            "total_parameters": total,
            "trainable_parameters": trainable,
            "components": comps,
            "new_tokens": dict(zip(self.new_tokens, self.new_token_ids_list, strict=True)),
            "seg_token_id": self.seg_token_id,
            "image_token_id": self.image_token_id,
        }


class _ParamHolder(nn.Module):
    """Groups the added-token rows with the LLM for counting."""

    def __init__(self, *params: nn.Parameter | None) -> None:
        super().__init__()
        self.params = nn.ParameterList([p for p in params if p is not None])

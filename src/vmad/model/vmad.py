"""VMADModel: frozen F_I -> Ψ (the LTC in the presets) -> Θ + LoRA + ``<seg>`` -> Γ -> M_decoder over the
visual backbone's features (Sec. III-B, Eq. 1-7). It composes the parts, like segment-anything's ``Sam``, and
defines the teacher-forced :meth:`~VMADModel.forward` and the one-pass :meth:`~VMADModel.segment`.

Each prompt's ``<image>`` becomes the M projector tokens (:mod:`vmad.model.sequence`); ``<seg>`` is found in
the ids after that splice. OURS (``llm.seg_state``): H̄_seg is the state at the first ``<seg>`` (``at_seg``)
or the one predicting it (``before_seg``), the same rule everywhere. OURS, optional
(``llm.mask_prompt_tokens``): :mod:`vmad.model.mask_prompt`. Decoding: :mod:`vmad.model.generation`; saving
and loading: :mod:`vmad.model.weights_io`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vmad.errors import VMADError
from vmad.model import generation, weights_io
from vmad.model.chat_format import IGNORE_INDEX, chat_format, tokenize_dialogues
from vmad.model.config import VMADConfig
from vmad.model.image_encoders import as_image_batch, tokens_to_maps
from vmad.model.layers import param_dtype
from vmad.model.llm import add_vmad_tokens
from vmad.model.ltc import LTC
from vmad.model.mask_prompt import MaskPrompt, insert_mask_prompt
from vmad.model.mask_refiner import MaskRefiner
from vmad.model.outputs import EncodedImages, GenerationResult, SegmentationResult, VMADOutput
from vmad.model.prior_prompt import prior_to_frame
from vmad.model.scoring import image_scores, score_logits
from vmad.model.seg_verdict import SegVerdict, gate_logits
from vmad.model.sequence import TokenSequence, first_index, seg_positions, splice
from vmad.model.summary import model_summary
from vmad.model.token_rows import NewTokenRows


class VMADModel(nn.Module):
    """The VMAD model; build it with :func:`vmad.model.build.build_vmad`.

    :meth:`forward` takes a batch from :meth:`prepare_batch`: ``images [B, 3, H, W]`` in [0, 1],
    ``input_ids``/``attention_mask``/``labels [B, T]`` (one ``<image>`` per sample, labels -100 on the
    prompt), ``masks [B, H, W]`` in {0, 1} and ``has_mask [B]`` (samples with a segmentation answer).
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
        self.vision_encoder = vision_encoder  # F_I, frozen
        self.projector = projector  # Ψ: an LTC (see .ltc) or a Table V comparison projector
        self.seg_head = seg_head  # Γ
        self.visual_backbone = visual_backbone  # frozen; None: the vision encoder's maps are shared
        self.neck = neck
        self.mask_decoder = mask_decoder
        llm_cfg = config.llm
        self.chat_format = chat_format(llm_cfg.template, llm_cfg.system_prompt, llm_cfg.image_token)
        for p in llm.parameters():
            p.requires_grad_(False)
        new_ids = add_vmad_tokens(llm, tokenizer, [llm_cfg.seg_token, llm_cfg.image_token])
        self.new_tokens = [tokenizer.convert_ids_to_tokens(i) for i in new_ids]
        self.seg_token_id = int(tokenizer.convert_tokens_to_ids(llm_cfg.seg_token))
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(llm_cfg.image_token))
        base_rows = min(llm.get_input_embeddings().weight.shape[0], len(tokenizer) - len(new_ids))
        self.new_token_rows = NewTokenRows(llm, new_ids, base_rows)
        self.mask_prompt: MaskPrompt | None = None
        if llm_cfg.mask_prompt_tokens:
            mean_row = self.new_token_rows.mean_input_row
            self.mask_prompt = MaskPrompt(
                mean_row.shape[0],
                llm_cfg.mask_prompt_tokens,
                llm_cfg.mask_prompt_grid,
                init_embedding=mean_row,
            ).to(self.new_token_rows.embed.device)
        self._optional_heads(config, llm.get_input_embeddings().weight.shape[1])
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
        self.llm = llm  # Θ (+ LoRA)
        # greedy decoding: the CPU defaults; the GPU fast path (vmad.model.fastpath) changes them
        self.decode_options = generation.DecodeOptions()

    def _optional_heads(self, config: VMADConfig, width: int) -> None:
        """OURS parts the config asks for, None when off: the ``<seg>`` verdict head (``seg_head.verdict``)
        and the mask refiner (``mask_decoder.refiner``)."""
        device = self.new_token_rows.embed.device
        self.seg_verdict = SegVerdict(width).to(device) if config.seg_head.verdict else None
        refiner = MaskRefiner.from_config(config.mask_decoder)
        self.mask_refiner = refiner.to(device) if refiner is not None else None

    # ----------------------------------------------------------------- parts
    @property
    def ltc(self) -> LTC | None:  # the LTC projector (Sec. III-D) when Ψ is one
        return self.projector if isinstance(self.projector, LTC) else None

    @property
    def device(self) -> torch.device:
        return self.new_token_rows.embed.device

    def base_lm(self) -> nn.Module:
        """The causal LM under the LoRA wrapper (LoRA layers are injected in place)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def train(self, mode: bool = True) -> VMADModel:
        super().train(mode)
        for frozen in (self.vision_encoder, self.visual_backbone):
            if frozen is not None:
                frozen.eval()
        return self

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.new_token_rows.embed_ids(self.base_lm().get_input_embeddings(), ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.new_token_rows.logits(self.base_lm().get_output_embeddings(), hidden)

    # ----------------------------------------------------------------- image side
    def encode_images(self, images: Tensor, priors: Tensor | None = None) -> EncodedImages:
        """F_I (frozen, no grad) then Ψ (Eq. 1-2). ``priors [B, 1, H', W']``: OURS, the normality prior over
        each image (:mod:`vmad.model.prior_prompt`; all-NaN rows: none), used only with
        ``mask_decoder.prior_prompt``."""
        images = images.to(self.device)
        with torch.no_grad():
            last, levels = self.vision_encoder(images)
        n = self.config.projector.n_levels
        dtype = param_dtype(self.projector)
        used = [level.to(dtype) for level in levels[len(levels) - n :]] if n else []
        tokens = self.projector(last.to(dtype), used)
        if priors is not None:
            priors = priors.to(self.device, torch.float32)
            if priors.dim() == 3:
                priors = priors[:, None]
            if priors.shape[0] != images.shape[0] or priors.dim() != 4 or priors.shape[1] != 1:
                got = tuple(priors.shape)
                raise VMADError(f"priors must be [B, 1, H, W] for {images.shape[0]} images, got {got}")
        return EncodedImages(images, last, list(levels), tokens, priors)

    def backbone_maps(self, encoded: EncodedImages) -> list[Tensor]:
        """The frozen visual backbone's maps ``[B, C_i, h, w]`` (or the shared encoder's tokens as maps),
        before the neck; also f of DSSL (Eq. 8-9)."""
        if self.visual_backbone is None:
            return tokens_to_maps(encoded.last, list(encoded.levels), self.vision_encoder.grid)
        with torch.no_grad():
            return self.visual_backbone(encoded.images)

    def image_embeddings(self, encoded: EncodedImages) -> Tensor:
        """f of Eq. 4 through the trained neck: ``[B, 256, h, w]`` (``encoded.embeddings`` when already
        computed)."""
        if encoded.embeddings is not None:
            return encoded.embeddings
        maps = self.backbone_maps(encoded)
        return maps[-1] if self.neck is None else self.neck([m.to(param_dtype(self.neck)) for m in maps])

    def verdict_logits(self, h_seg: Tensor) -> Tensor | None:
        """``[K]`` log-odds that each image is anomalous, from H̄_seg (OURS, ``seg_head.verdict``); None when
        the model has no verdict head."""
        if self.seg_verdict is None:
            return None
        return self.seg_verdict(h_seg.to(param_dtype(self.seg_verdict))).float()

    def mask_logits(self, encoded: EncodedImages, h_seg: Tensor, size: tuple[int, int]) -> Tensor:
        """Eq. 4-5: H_seg = Γ(H̄_seg); M̄ = M_decoder(H_seg, f), upsampled to ``size``: ``[K, H, W]`` logits.
        With a verdict head each pixel's probability is multiplied by the image's verdict (OURS)."""
        prompts = self.seg_head(h_seg.to(param_dtype(self.seg_head)))[:, None]
        dtype = param_dtype(self.mask_decoder)
        frame = self.visual_backbone if self.visual_backbone is not None else self.vision_encoder
        prior = None
        if encoded.priors is not None and self.config.mask_decoder.prior_prompt:
            prior = prior_to_frame(encoded.priors, frame.resize, frame.image_size)
        low = self.mask_decoder(self.image_embeddings(encoded).to(dtype), prompts.to(dtype), prior)
        logits = frame.to_image(low.float(), size)[:, 0]  # un-pad and un-resize to the image
        verdict = self.verdict_logits(h_seg)
        return logits if verdict is None else gate_logits(logits, verdict)

    @torch.no_grad()
    def refined_mask_logits(self, images: Tensor, logits: Tensor) -> Tensor:
        """OURS, models with ``mask_decoder.refiner``: the binary mask's logits, ``logits [K, H, W]`` (the
        decoder's, at the size of ``images [K, 3, H', W']``) corrected at full resolution
        (:mod:`vmad.model.mask_refiner`), on the decoder's logit scale (``MaskRefiner.unbounded``). The maps
        and image scores stay the decoder's."""
        if self.mask_refiner is None:
            raise VMADError("this model has no mask refiner (mask_decoder.refiner is off)")
        dtype = param_dtype(self.mask_refiner)
        refined = self.mask_refiner(images.to(self.device, dtype), logits.to(self.device, dtype))
        return self.mask_refiner.unbounded(refined.float())

    def mask_probs(self, encoded: EncodedImages, h_seg: Tensor) -> Tensor:
        """Mask probabilities at the input image size."""
        return self.mask_logits(encoded, h_seg, tuple(encoded.images.shape[-2:])).sigmoid()

    # ----------------------------------------------------------------- text side
    def prepare_batch(
        self,
        images: Tensor,
        questions: Sequence[str],
        answers: Sequence[str | None] | None = None,
        masks: Tensor | None = None,
        padding_side: str = "right",
    ) -> dict[str, Tensor]:
        """A :meth:`forward` batch from raw parts (``has_mask``: the answer contains ``<seg>``)."""
        enc = tokenize_dialogues(self.tokenizer, self.chat_format, questions, answers, padding_side)
        batch = {"images": images, **enc}
        has = [a is not None and self.config.llm.seg_token in a for a in (answers or [None] * len(questions))]
        batch["has_mask"] = torch.tensor(has, dtype=torch.bool)
        if masks is not None:
            batch["masks"] = masks
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def splice_images(
        self, ids: Tensor, attention: Tensor, encoded: EncodedImages, labels: Tensor | None = None
    ) -> TokenSequence:
        """Each sample's single ``<image>`` replaced by its M visual tokens."""
        where, _ = first_index(ids, self.image_token_id)
        if not bool(((ids == self.image_token_id).sum(1) == 1).all()):
            raise VMADError(f"every prompt needs exactly one {self.config.llm.image_token} token")
        seq = TokenSequence(self.embed_tokens(ids), ids, attention, labels)
        vis = encoded.visual_tokens
        return splice(seq, where.tolist(), vis, self.image_token_id, [True] * len(ids), replace=True)

    def run_llm(self, embeds: Tensor, attention: Tensor, positions: Tensor, cache: Any = None) -> Tensor:
        """Last-layer (normed) hidden states; ``cache`` (a KV cache, updated in place) for decoding."""
        decoder = self.base_lm().model
        kwargs = generation.cache_kwargs(decoder, cache)
        return decoder(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions, **kwargs
        ).last_hidden_state

    def seg_positions(self, ids: Tensor) -> Tensor:  # H̄_seg per sample, -1 without <seg>
        return seg_positions(ids, self.seg_token_id, self.config.llm.seg_state == "before_seg")

    def teacher_forced(
        self,
        images: Tensor,
        ids: Tensor,
        attention: Tensor,
        labels: Tensor | None,
        priors: Tensor | None = None,
    ) -> tuple[TokenSequence, Tensor, EncodedImages]:
        """Encode, splice, insert the mask prompt (when on) and run the LLM over whole dialogues."""
        encoded = self.encode_images(images, priors)
        seq = self.splice_images(ids, attention, encoded, labels)
        if self.mask_prompt is not None:
            seq = insert_mask_prompt(self, encoded, seq)
        return seq, self.run_llm(seq.embeds, seq.attention, seq.position_ids()), encoded

    # ----------------------------------------------------------------- passes
    def forward(self, batch: Mapping[str, Any]) -> VMADOutput:
        """Teacher-forced pass over whole dialogues; the losses (Eq. 6-7, 17) are computed from its output
        by :mod:`vmad.train.losses`. Samples without a segmentation answer get no mask."""
        device = self.device
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        seq, hidden, encoded = self.teacher_forced(
            batch["images"], ids, attention, batch["labels"].to(device), batch.get("priors")
        )
        assert seq.labels is not None
        target = seq.labels[:, 1:]
        keep = target != IGNORE_INDEX
        seg_pos = self.seg_positions(seq.ids)
        has_mask = batch.get("has_mask")
        has_mask = (seg_pos >= 0) if has_mask is None else has_mask.to(device).bool()
        if bool((has_mask & (seg_pos < 0)).any()):
            raise VMADError("a sample marked has_mask has no <seg> token in its answer")
        rows = torch.nonzero(has_mask).flatten()
        mask_logits = mask_targets = verdict = None
        if len(rows):
            if batch.get("masks") is None:
                raise VMADError("the batch has segmentation answers but no 'masks'")
            mask_targets = batch["masks"].to(device)[rows]
            h_seg = hidden[rows, seg_pos[rows]]
            mask_logits = self.mask_logits(encoded.rows(rows), h_seg, tuple(mask_targets.shape[-2:]))
            verdict = self.verdict_logits(h_seg)
        return VMADOutput(
            answer_logits=self.logits(hidden[:, :-1][keep]),
            answer_targets=target[keep],
            mask_logits=mask_logits,
            mask_targets=mask_targets,
            mask_rows=rows,
            hidden_states=hidden,
            ids=seq.ids,
            seg_positions=seg_pos,
            encoded=encoded,
            verdict_logits=verdict,
        )

    @torch.no_grad()
    def segment(
        self,
        images: Tensor,
        question: str | Sequence[str],
        priors: Tensor | None = None,
        encoded: EncodedImages | None = None,
    ) -> SegmentationResult:
        """Fast path: ONE forward with the segmentation-only answer (``llm.seg_answer``, "It is <seg>."),
        then the mask at the input size and the image score. ``priors``: see :meth:`encode_images`;
        ``encoded``: these images already encoded (e.g. ``GenerationResult.encoded.rows(...)``), so the
        frozen encoders are not run again. The batch goes through the encoders, the LLM (right padding,
        each sample's own ``<seg>``) and the decoder together. Call ``eval()`` first."""
        images = as_image_batch(images)
        n = images.shape[0]
        questions = [question] * n if isinstance(question, str) else list(question)
        enc = tokenize_dialogues(
            self.tokenizer, self.chat_format, questions, [self.config.llm.seg_answer] * n
        )
        if encoded is None:
            encoded = self.encode_images(images, priors)
        elif encoded.images.shape[0] != n:
            raise VMADError(f"encoded holds {encoded.images.shape[0]} images, not {n}")
        seq = self.splice_images(
            enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), encoded
        )
        hidden = self.run_llm(seq.embeds, seq.attention, seq.position_ids())
        h_seg = hidden[torch.arange(n, device=self.device), self.seg_positions(seq.ids)]
        logits = self.mask_logits(encoded, h_seg, tuple(images.shape[-2:]))
        probs = logits.sigmoid()
        cfg = self.config.score
        if cfg.space == "logit":
            z = score_logits(probs, cfg, encoded.priors, logits)
            return SegmentationResult(probs=probs, logits=logits, scores=torch.sigmoid(z), score_logits=z)
        scores = image_scores(probs, cfg, encoded.priors)
        return SegmentationResult(probs=probs, logits=logits, scores=scores,
                                  score_logits=torch.logit(scores.double().clamp(1e-12, 1 - 1e-12)))

    def generate(
        self,
        images: Tensor,
        question: str | Sequence[str],
        max_new_tokens: int = 64,
        priors: Tensor | None = None,
        ignore_stop: bool = False,
        prefixes: Sequence[str | None] | None = None,
        encoded: EncodedImages | None = None,
        avoid: Sequence[str | None] | None = None,
    ) -> GenerationResult:
        """Greedy answers and their masks (:func:`vmad.model.generation.generate`); ``priors``: see
        :meth:`encode_images`; ``ignore_stop``: exactly ``max_new_tokens`` tokens (timing); ``prefixes``:
        forced answer openings and ``avoid`` texts the rest must not open with (OURS); ``encoded``: reuse
        these images' encoding. Call ``eval()`` first."""
        return generation.generate(
            self, images, question, max_new_tokens, priors=priors, ignore_stop=ignore_stop,
            prefixes=prefixes, encoded=encoded, avoid=avoid,
        )

    def answer_logprobs(
        self, images: Tensor, question: str | Sequence[str], answer: str | Sequence[str], after: str = ""
    ) -> Tensor:
        """Teacher-forced log-likelihood of ``answer`` (:func:`vmad.model.generation.answer_logprobs`)."""
        return generation.answer_logprobs(self, images, question, answer, after)

    def save_trainable(self, path: str | Path) -> Path:
        """Write the trained parts and the config to folder ``path`` (:mod:`vmad.model.weights_io`)."""
        return weights_io.save_trainable(self, path)

    def load_trainable(
        self, path: str | Path, keep_fresh: Sequence[str] = (), leave_out: Sequence[str] = ()
    ) -> list[str]:
        """Load :meth:`save_trainable`'s weights (:func:`vmad.model.weights_io.load_trainable`)."""
        return weights_io.load_trainable(self, path, keep_fresh, leave_out)

    def summary(self) -> dict[str, Any]:
        """Parameter counts per component and the visual-token count."""
        return model_summary(self)

"""VMAD model configuration: one dataclass per part (Sec. III-B, Eq. 1-7), assembled by :class:`VMADConfig`.

Every value the paper leaves open is a field here, marked OURS in its docstring. Saved models store the full
:meth:`VMADConfig.to_dict`; a YAML ``model:`` section names a preset of :func:`vmad.model.build.preset_config`
and lists only the fields it changes (resolved by :func:`vmad.train.config.resolve_model_section`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vmad.config import check_choices, from_mapping, to_dict
from vmad.errors import ConfigError
from vmad.model.projectors import ProjectorConfig

VisionKind = Literal["tiny", "efficientnet_lite0", "clip"]
LLMKind = Literal["tiny", "smollm2", "llava"]
Template = Literal["paper", "chatml"]
SegState = Literal["at_seg", "before_seg"]
DType = Literal["float32", "bfloat16", "float16"]
BackboneKind = Literal["tiny", "shared", "sam"]
ResizeRule = Literal["pad_square", "longest_side", "stretch"]
DecoderKind = Literal["scratch", "sam"]
MaskQuery = Literal["mask_token", "seg_state"]
ScoreRule = Literal["max_smoothed", "max", "mean_topk"]
ScoreSpace = Literal["probability", "logit"]


# Upper bounds of the size fields, checked before anything is allocated (a corrupt or hand-edited config.json
# must give one error line, not an attempt to build a 1e9-wide layer). They comfortably include the paper
# preset (LLaVA-1.5-7B: 4096 hidden, 11008 MLP, 32 layers, 32 heads, 32064 vocabulary rows; CLIP 336 px;
# SAM 1024 px, 2048-wide decoder MLP).
MAX_IMAGE_SIZE = 8192
MAX_WIDTH = 32768  # hidden sizes, channel widths, prompt dims
MAX_MLP = 131072  # intermediate / MLP widths
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_VOCAB = 1 << 21  # 2,097,152 rows
MAX_COUNT = 4096  # levels, LoRA rank, mask-prompt tokens and grid, projector queries/points/blocks


def check_range(where: str, value: Any, low: int, high: int) -> None:
    """Raise :class:`ConfigError` unless the integer ``value`` lies in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer in [{low}, {high}], got {value!r}")


@dataclass
class VisionConfig:
    """Frozen vision encoder F_I (Eq. 1): returns its feature layer and the ``n_levels`` layers before it.

    Attributes:
        kind: ``tiny`` (random ViT), ``efficientnet_lite0`` (small preset), ``clip`` (CLIP ViT-L/14-336 of
            LLaVA).
        image_size: square input side the encoder sees (images are resized to it).
        n_levels: earlier levels returned for LTC's multi-level integration (paper n = 4, Eq. 21).
        feature_layer: hidden-state index used as the last layer (LLaVA: -2, CLS dropped).
        pretrained: load real weights (efficientnet_lite0); ignored for tiny.
        width, layers, heads, patch: tiny encoder shape.
        resize: how an image becomes the square input (:class:`vmad.model.image_encoders.FrozenImageModule`):
            ``pad_square`` (LLaVA-1.5's: mean-colour padding, bicubic), ``longest_side`` (SAM's) or
            ``stretch`` (the rule of models saved before this field existed, e.g. the shipped VMAD-small).
    """

    kind: VisionKind = "tiny"
    image_size: int = 64
    n_levels: int = 4
    feature_layer: int = -2
    pretrained: bool = True
    width: int = 32
    layers: int = 6
    heads: int = 4
    patch: int = 8
    resize: ResizeRule = "pad_square"

    def validate(self) -> None:
        check_choices(self, "model.vision")
        if self.image_size < 16:
            raise ConfigError(f"vision.image_size must be >= 16, got {self.image_size}")
        check_range("vision.image_size", self.image_size, 16, MAX_IMAGE_SIZE)
        check_range("vision.n_levels", self.n_levels, 0, MAX_COUNT)
        check_range("vision.feature_layer", self.feature_layer, -MAX_LAYERS, MAX_LAYERS)
        check_range("vision.width", self.width, 1, MAX_WIDTH)
        check_range("vision.layers", self.layers, 1, MAX_LAYERS)
        check_range("vision.heads", self.heads, 1, MAX_HEADS)
        check_range("vision.patch", self.patch, 1, self.image_size)


@dataclass
class LLMConfig:
    """Causal LLM Θ (Eq. 3) and its prompt layout.

    Attributes:
        kind: ``tiny`` (random Llama), ``smollm2`` (SmolLM2-135M-Instruct), ``llava`` (LLaVA-1.5-7B's LM).
        template: ``paper`` = "<system> USER: <image>\\n{question} ASSISTANT: {answer}</s>" (Sec. V-A.2,
            LLaVA v1) or ``chatml`` = the SmolLM2 tokenizer's own chat template (OURS for small: keeps its
            instruction tuning).
        system_prompt: text before the first turn (OURS; LLaVA v1's system line for ``paper``).
        seg_token / image_token: the added tokens; their ids are looked up with ``convert_tokens_to_ids``.
        seg_state: OURS. Which last-layer hidden state feeds Γ: ``at_seg`` = the state at the ``<seg>``
            position (default), ``before_seg`` = the state that predicts ``<seg>`` (LISA). Same rule in
            training and inference.
        seg_answer: the segmentation-only answer used by the fast path (Sec. V-A.2 template).
        mask_prompt_tokens: OURS. Number of embeddings of the predicted mask inserted right after ``<seg>``
            (:mod:`vmad.model.mask_prompt`), so the text after ``<seg>`` is conditioned on the mask; 0 = off,
            the paper's model.
        mask_prompt_grid: side of the max-pooled mask grid those embeddings are computed from.
        dtype: weight dtype of the LLM.
        hidden_size, layers, heads, intermediate_size, vocab_rows: tiny LLM shape (vocab_rows > tokenizer
            length, a padded vocabulary, so the no-shrink rule is exercised).
    """

    kind: LLMKind = "tiny"
    template: Template = "paper"
    system_prompt: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    seg_token: str = "<seg>"
    image_token: str = "<image>"
    seg_state: SegState = "at_seg"
    seg_answer: str = "It is <seg>."
    mask_prompt_tokens: int = 0
    mask_prompt_grid: int = 8
    dtype: DType = "float32"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    vocab_rows: int = 1024

    def validate(self) -> None:
        check_choices(self, "model.llm")
        if self.mask_prompt_tokens < 0 or self.mask_prompt_grid < 1:
            raise ConfigError(
                f"llm.mask_prompt_tokens must be >= 0 and llm.mask_prompt_grid >= 1, got "
                f"{self.mask_prompt_tokens} and {self.mask_prompt_grid}"
            )
        check_range("llm.mask_prompt_tokens", self.mask_prompt_tokens, 0, MAX_COUNT)
        check_range("llm.mask_prompt_grid", self.mask_prompt_grid, 1, MAX_COUNT)
        check_range("llm.hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_range("llm.layers", self.layers, 1, MAX_LAYERS)
        check_range("llm.heads", self.heads, 1, MAX_HEADS)
        check_range("llm.intermediate_size", self.intermediate_size, 1, MAX_MLP)
        check_range("llm.vocab_rows", self.vocab_rows, 1, MAX_VOCAB)
        if self.seg_token not in self.seg_answer:
            raise ConfigError(f"llm.seg_answer {self.seg_answer!r} must contain {self.seg_token!r}")


@dataclass
class LoRAConfig:
    """LoRA on the LLM (PEFT). r = 8 from the paper; alpha, dropout and targets are OURS (LISA's)."""

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        check_range("lora.r", self.r, 1, MAX_COUNT)


@dataclass
class SegHeadConfig:
    """Γ of Eq. 4: Linear-ReLU-Linear from the LLM width to the decoder's prompt width (256 in the paper).

    ``hidden`` None = the LLM width (OURS, LISA's text_hidden_fcs). ``verdict`` (OURS, off = the paper): a
    linear head on H̄_seg whose probability that the image is anomalous multiplies every mask probability
    (:mod:`vmad.model.seg_verdict`), trained with weight ``model.loss.verdict``."""

    out_dim: int = 256
    hidden: int | None = None
    verdict: bool = False

    def validate(self) -> None:
        check_range("seg_head.out_dim", self.out_dim, 1, MAX_WIDTH)
        if self.hidden is not None:
            check_range("seg_head.hidden", self.hidden, 1, MAX_MLP)


@dataclass
class BackboneConfig:
    """Frozen visual backbone V_backbone of Eq. 4.

    Attributes:
        kind: ``tiny`` (random conv net), ``shared`` (reuse the vision encoder's features: small preset,
            EfficientNet-Lite0 stride-16 blocks), ``sam`` (SAM ViT-H image encoder, paper).
        image_size: square input side of the backbone (SAM: 1024).
        width: tiny backbone width.
        resize: as ``vision.resize``; default SAM's ``longest_side`` (ignored for ``shared``: the masks then
            live in the vision encoder's frame).
    """

    kind: BackboneKind = "tiny"
    image_size: int = 64
    width: int = 32
    resize: ResizeRule = "longest_side"

    def validate(self) -> None:
        check_choices(self, "model.backbone")
        check_range("backbone.image_size", self.image_size, 16, MAX_IMAGE_SIZE)
        check_range("backbone.width", self.width, 1, MAX_WIDTH)


@dataclass
class MaskDecoderConfig:
    """M_decoder of Eq. 5: SAM's two-way-transformer mask decoder, prompted by H_seg as one sparse token.

    Attributes:
        kind: ``scratch`` (random SAM-architecture decoder) or ``sam`` (SAM ViT-H's decoder weights).
        dim: prompt / image-embedding width (SAM: 256).
        layers, heads, mlp_dim: two-way transformer shape (SAM: 2, 8, 2048).
        neck: map backbone features to ``dim`` channels (conv1x1-LN-conv3x3-LN as SAM's neck); needed unless
            the backbone already outputs ``dim`` channels (SAM).
        logit_bias: initial value of a learned scalar added to the mask logits. OURS: a decoder trained from
            scratch starts at the defect-pixel prior (log(0.01/0.99), RetinaNet's prior init), so training
            does not first spend its steps pushing every pixel down; 0 for SAM's calibrated decoder.
        prior_prompt: OURS, not in the paper: a zero-shot normality prior map (mutual scoring over a folder
            and/or reference normal images) is encoded as SAM's dense mask prompt
            (:mod:`vmad.model.prior_prompt`). Off in every preset (the paper's decoder sees only H_seg).
        prior_skip: OURS, with ``prior_prompt``: also add a learned multiple of the prior to the mask logits.
        prior_skip_init: OURS, the skip's initial weight (logit units per standard unit of the prior);
            0 = the model starts exactly as without the prior. ``vmad model add-prior`` sets it on trained
            weights without training (late fusion).
        prior_skip_offset: OURS, the skip adds ``w * (prior - offset)``: the prior's neutral point in
            standard units. With 0 every patch above a typical one pushes the mask up and most of a normal
            image is masked at probability 0.5; ``vmad model add-prior`` sets it so that the binary mask
            needs defect-like evidence. A constant per image: no ranking within an image, and no ranking of
            images that all have a prior, changes.
        mask_query: which decoder token reads the mask out of the upscaled embedding (SAM: the hypernetwork
            applied to its learned mask token, ``mask_token``, the paper's and every preset's default). OURS,
            ``seg_state``: the hypernetwork is applied to the output of the H_seg prompt token itself, so the
            mask is a direct function of the LLM's ``<seg>`` state (:mod:`vmad.model.mask_decoder`).
        refiner: OURS, not in the paper: a small full-resolution net corrects the upsampled mask logits from
            the image's own pixels for the binary mask (maps and image scores stay the decoder's), so thin
            and small defects get pixel-precise masks
            (:mod:`vmad.model.mask_refiner`); trained alone by ``vmad model add-refiner``. Off in every
            preset.
        refiner_width, refiner_dilations, refiner_limit: its channels, the dilations of its residual 3x3
            convolutions, and the bound L of the logits it corrects (``L * tanh(logit / L)``).
        refiner_max_side: a larger image's correction is computed at this longest side and upsampled (cost
            and the pixel scale it was trained at, images of at most 320 px); 0 = always at full size.
        refiner_shrink: the correction can only lower a logit, so the refined binary mask lies within the
            decoder's (a normal image the decoder leaves clean stays clean).
    """

    kind: DecoderKind = "scratch"
    dim: int = 256
    layers: int = 2
    heads: int = 8
    mlp_dim: int = 2048
    neck: bool = True
    logit_bias: float = -4.59512
    prior_prompt: bool = False
    prior_skip: bool = True
    prior_skip_init: float = 0.0
    prior_skip_offset: float = 0.0
    mask_query: MaskQuery = "mask_token"
    refiner: bool = False
    refiner_width: int = 16
    refiner_dilations: tuple[int, ...] = (1, 2, 4, 8, 1)
    refiner_limit: float = 20.0
    refiner_max_side: int = 384
    refiner_shrink: bool = False

    def validate(self) -> None:
        check_choices(self, "model.mask_decoder")
        check_range("mask_decoder.refiner_width", self.refiner_width, 1, MAX_WIDTH)
        if not self.refiner_dilations or any(int(d) < 1 or int(d) > 64 for d in self.refiner_dilations):
            raise ConfigError(f"mask_decoder.refiner_dilations must be 1-64 each (at least one), got "
                              f"{self.refiner_dilations}")
        if self.refiner_max_side and self.refiner_max_side < 16:
            raise ConfigError(f"mask_decoder.refiner_max_side must be 0 (full size) or >= 16, got "
                              f"{self.refiner_max_side}")
        if not math.isfinite(self.refiner_limit) or not 1.0 <= self.refiner_limit <= 1000.0:
            raise ConfigError(f"mask_decoder.refiner_limit must be in [1, 1000], got {self.refiner_limit}")
        if not math.isfinite(self.prior_skip_offset) or abs(self.prior_skip_offset) > 12:
            raise ConfigError(f"mask_decoder.prior_skip_offset must be finite and within ±12, got "
                              f"{self.prior_skip_offset}")
        if not math.isfinite(self.prior_skip_init) or abs(self.prior_skip_init) > 100:
            raise ConfigError(f"mask_decoder.prior_skip_init must be finite and within ±100, got "
                              f"{self.prior_skip_init}")
        check_range("mask_decoder.dim", self.dim, 8, MAX_WIDTH)
        check_range("mask_decoder.layers", self.layers, 1, MAX_LAYERS)
        check_range("mask_decoder.heads", self.heads, 1, MAX_HEADS)
        check_range("mask_decoder.mlp_dim", self.mlp_dim, 1, MAX_MLP)
        if self.dim % 8 or self.dim % self.heads:
            raise ConfigError(f"mask_decoder.dim must be divisible by 8 and by heads, got {self.dim}")


@dataclass
class LossConfig:
    """Loss weights of Eq. 6-7: λ_txt = 1, λ_bce = 2, λ_dice = 0.5 (OURS, LISA's), λ_seg = 1.

    ``pbsd`` is λ_pbsd of Eq. 7, the weight of DSSL's L_pbsd (Eq. 17; OURS: 1.0); it applies only when
    DSSL is trained (``train.dssl``). ``verdict`` (OURS): weight of the image-level BCE of the ``<seg>``
    verdict head (models with ``seg_head.verdict``) against "the target mask is not blank"."""

    txt: float = 1.0
    seg: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    pbsd: float = 1.0
    verdict: float = 1.0

    def validate(self) -> None:
        if self.pbsd < 0:
            raise ConfigError(f"model.loss.pbsd must be >= 0, got {self.pbsd}")
        if self.verdict < 0:
            raise ConfigError(f"model.loss.verdict must be >= 0, got {self.verdict}")


@dataclass
class ScoreConfig:
    """Image-level anomaly score from the mask probability map (OURS, Table I).

    ``max_smoothed`` (default): max of the map after a Gaussian blur of ``sigma`` pixels at the input size;
    ``max``: plain max; ``mean_topk``: mean of the top ``topk_ratio`` fraction of pixels.
    ``prior_weight`` (OURS, models with ``mask_decoder.prior_prompt``): an image with a normality prior
    scores ``sigmoid(logit(score) + prior_weight * (max(prior) - PRIOR_NEUTRAL))``, the prior's maximum in
    standard units (:func:`vmad.model.scoring.image_scores`); 0 = the mask alone.
    ``space`` (OURS): ``probability`` (default) applies the rule to the probability map; ``logit`` applies it
    to the mask logits and keeps the score's log-odds, so the evaluation ranks maps and images by log-odds,
    which never saturate (with a prior skip, float32 probabilities reach exactly 1 and tie)."""

    rule: ScoreRule = "max_smoothed"
    sigma: float = 4.0
    topk_ratio: float = 0.01
    prior_weight: float = 0.0
    space: ScoreSpace = "probability"

    def validate(self) -> None:
        check_choices(self, "model.score")
        if not math.isfinite(self.prior_weight) or not 0 <= self.prior_weight <= 100:
            raise ConfigError(f"model.score.prior_weight must be in [0, 100], got {self.prior_weight}")


@dataclass
class VMADConfig:
    """The whole model. ``llava_path`` / ``sam_path``: local Hugging Face folders for the paper preset."""

    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seg_head: SegHeadConfig = field(default_factory=SegHeadConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    llava_path: str | None = None
    sam_path: str | None = None
    seed: int = 0

    def validate(self) -> VMADConfig:
        parts = (
            self.vision,
            self.llm,
            self.lora,
            self.seg_head,
            self.backbone,
            self.mask_decoder,
            self.loss,
            self.score,
        )
        for part in parts:
            part.validate()
        self.projector.validate()
        for name in ("rho", "n_levels", "local_blocks", "points", "resampler_layers", "num_queries"):
            value = getattr(self.projector, name)
            if value is not None:
                check_range(f"projector.{name}", value, 0, MAX_COUNT)
        check_range("projector.heads", self.projector.heads, 1, MAX_HEADS)
        if self.projector.hidden is not None:
            check_range("projector.hidden", self.projector.hidden, 1, MAX_MLP)
        if self.projector.n_levels > self.vision.n_levels:
            raise ConfigError(
                f"projector.n_levels={self.projector.n_levels} exceeds vision.n_levels={self.vision.n_levels}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMADConfig:
        """A full model config, as saved with a model (legacy keys: :func:`upgrade_legacy_model`)."""
        return from_mapping(cls, upgrade_legacy_model(data), "model").validate()


# Every field a saved section had before ``resize`` existed (such a model was trained on stretched images).
LEGACY_RESIZE_SECTIONS: dict[str, frozenset[str]] = {
    "vision": frozenset(
        ("kind", "image_size", "n_levels", "feature_layer", "pretrained", "width", "layers", "heads", "patch")
    ),
    "backbone": frozenset(("kind", "image_size", "width")),
}


def upgrade_legacy_model(data: Mapping[str, Any]) -> dict[str, Any]:
    """A model config as saved by earlier versions: without ``loss.extra`` (a non-empty one is an error), and
    ``resize: stretch`` for vision/backbone sections saved before that field existed."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"model must be a mapping, got {type(data).__name__}")
    data = copy.deepcopy(dict(data))
    for section, fields_before in LEGACY_RESIZE_SECTIONS.items():  # saved before ``resize`` existed
        part = data.get(section)
        if isinstance(part, Mapping) and "resize" not in part and fields_before <= part.keys():
            if part.get("kind") != "shared":  # a shared backbone has no input rule of its own
                data[section] = {**part, "resize": "stretch"}
    loss = data.get("loss")
    if isinstance(loss, Mapping) and "extra" in loss:
        if loss["extra"]:
            raise ConfigError(
                f"model.loss.extra {dict(loss['extra'])} is no longer supported "
                "(model.loss.pbsd is the only auxiliary-loss weight)"
            )
        data["loss"] = {key: value for key, value in loss.items() if key != "extra"}
    return data

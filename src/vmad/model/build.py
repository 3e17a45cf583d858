"""The one place that assembles VMAD presets (like segment-anything's ``build_sam``).

- ``tiny``: random tiny ViT, LTC, random tiny Llama + in-code tokenizer, random conv backbone and a small
  SAM-architecture decoder; deterministic for a given ``seed`` (so a saved checkpoint reloads exactly).
- ``small``: EfficientNet-Lite0 (ImageNet weights) as vision encoder *and* visual backbone (shared), at
  384x384: its stride-16 blocks form a 24x24 grid = 576 tokens, exactly the paper's CLIP-336 grid, so LTC with
  rho = 2 yields the paper's 12x12 = 144 visual tokens (each token covers 32x32 px, the paper's 28x28 at
  336 px) and the mask decoder sees a 24x24 embedding upsampled x4 to 96x96 before the final resize;
  SmolLM2-135M-Instruct; SAM-architecture decoder + neck trained from scratch.
- ``paper``: LLaVA-1.5-7B (CLIP ViT-L/14-336 + its language model) and SAM ViT-H from local Hugging Face
  folders; the LTC starts from LLaVA's pretrained projector (``projector.init_from_llava``, OURS).
  ``random_weights`` builds the same shapes on the meta device (no download, no memory): for summaries; pass
  ``on_meta=False`` to materialise random weights (e.g. for GPU timing).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vmad.errors import ConfigError, VMADError
from vmad.model import weights_io
from vmad.model.config import (
    BackboneConfig,
    LLMConfig,
    MaskDecoderConfig,
    SegHeadConfig,
    VisionConfig,
    VMADConfig,
)
from vmad.model.image_encoders import (
    CLIPVisionEncoder,
    EfficientNetVisionEncoder,
    SamBackbone,
    TinyConvBackbone,
    TinyVisionEncoder,
    clip_vit_l14_336_config,
)
from vmad.model.llm import (
    DTYPES,
    build_tiny_llm,
    build_tiny_tokenizer,
    causal_lm_from_llava,
    check_local_folder,
    llava_text_config,
    load_smollm2,
)
from vmad.model.ltc import LTC, copy_mlp2x_gelu
from vmad.model.mask_decoder import FeatureNeck, PromptedMaskDecoder
from vmad.model.projectors import (
    AvgPoolProjector,
    LDPv2Projector,
    MLPProjector,
    Projector,
    ProjectorConfig,
    ResamplerProjector,
    pooled_side,
)
from vmad.model.seg_head import SegHead
from vmad.model.vmad import VMADModel

PRESETS = ("tiny", "small", "paper")

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def preset_config(name: str) -> VMADConfig:
    """The default configuration of a preset; a YAML ``model:`` section naming ``preset: <name>`` starts from
    it and lists only the fields it changes (:func:`vmad.train.config.resolve_model_section`)."""
    if name == "tiny":
        cfg = VMADConfig(
            preset="tiny",
            vision=VisionConfig(kind="tiny", image_size=64, width=32, layers=6, heads=4, patch=8),
            projector=ProjectorConfig(kind="ltc", rho=2, n_levels=4, heads=4, points=2, local_blocks=1),
            llm=LLMConfig(
                kind="tiny",
                template="paper",
                hidden_size=64,
                layers=2,
                heads=4,
                intermediate_size=128,
                vocab_rows=1024,
            ),
            seg_head=SegHeadConfig(out_dim=32),
            backbone=BackboneConfig(kind="tiny", image_size=64, width=32),
            mask_decoder=MaskDecoderConfig(kind="scratch", dim=32, layers=1, heads=4, mlp_dim=64),
        )
    elif name == "small":
        cfg = VMADConfig(
            preset="small",
            vision=VisionConfig(kind="efficientnet_lite0", image_size=384, n_levels=4),
            projector=ProjectorConfig(kind="ltc", rho=2, n_levels=4),
            llm=LLMConfig(kind="smollm2", template="chatml", system_prompt=SMOLLM2_SYSTEM),
            seg_head=SegHeadConfig(out_dim=256),
            backbone=BackboneConfig(kind="shared", image_size=384),
            mask_decoder=MaskDecoderConfig(kind="scratch", dim=256, layers=2, heads=8, mlp_dim=2048),
        )
    elif name == "paper":
        cfg = VMADConfig(
            preset="paper",
            vision=VisionConfig(kind="clip", image_size=336, n_levels=4, feature_layer=-2),
            projector=ProjectorConfig(kind="ltc", rho=2, n_levels=4),
            llm=LLMConfig(kind="llava", template="paper", dtype="bfloat16"),
            seg_head=SegHeadConfig(out_dim=256),
            backbone=BackboneConfig(kind="sam", image_size=1024),
            mask_decoder=MaskDecoderConfig(kind="sam", dim=256, neck=False, logit_bias=0.0),
        )
    else:
        raise ConfigError(f"unknown preset {name!r}; choose one of {PRESETS}")
    return cfg.validate()


def _sam_vit_h_config() -> Any:
    from transformers import SamConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]
    )
    return SamConfig(vision_config=vision.to_dict())


def _vision(cfg: VMADConfig, random_weights: bool, llava: Any) -> nn.Module:
    v = cfg.vision
    if v.kind == "tiny":
        return TinyVisionEncoder(v)
    if v.kind == "efficientnet_lite0":
        from vmad.model.efficientnet import load_efficientnet_lite0

        return EfficientNetVisionEncoder(
            load_efficientnet_lite0(pretrained=v.pretrained and not random_weights), v
        )
    if llava is not None:
        return CLIPVisionEncoder(llava.model.vision_tower, v)
    from transformers import CLIPVisionModel

    return CLIPVisionEncoder(CLIPVisionModel(clip_vit_l14_336_config()), v)


def _llm(cfg: VMADConfig, random_weights: bool, llava: Any, llava_path: str | None) -> tuple[nn.Module, Any]:
    lc = cfg.llm
    if lc.kind == "tiny":
        return build_tiny_llm(lc), build_tiny_tokenizer()
    if random_weights:  # same shapes; the in-code tokenizer stands in (its ids fit in the padded vocabulary)
        from transformers import LlamaConfig, LlamaForCausalLM

        if lc.kind == "smollm2":
            shape = LlamaConfig(
                vocab_size=49152,
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                tie_word_embeddings=True,
                max_position_embeddings=8192,
            )
        else:
            shape = llava_text_config()
        return LlamaForCausalLM(shape), build_tiny_tokenizer()
    if lc.kind == "smollm2":
        with torch.device("cpu"):
            return load_smollm2(dtype=DTYPES[lc.dtype])
    from transformers import AutoTokenizer

    return causal_lm_from_llava(llava), AutoTokenizer.from_pretrained(llava_path, local_files_only=True)


def _backbone_and_decoder(
    cfg: VMADConfig, vision: nn.Module, random_weights: bool
) -> tuple[nn.Module | None, nn.Module | None, nn.Module]:
    b, d = cfg.backbone, cfg.mask_decoder
    sam = None
    if b.kind == "sam" or d.kind == "sam":
        from transformers import SamModel

        if random_weights:
            sam = SamModel(_sam_vit_h_config())
        else:
            folder = check_local_folder(cfg.sam_path, "SAM ViT-H (e.g. facebook/sam-vit-huge)", "sam_path")
            sam = SamModel.from_pretrained(folder, local_files_only=True, dtype=DTYPES[cfg.llm.dtype])
    if b.kind == "tiny":
        backbone: nn.Module | None = TinyConvBackbone(b)
        channels = backbone.out_channels
    elif b.kind == "shared":
        backbone = None
        channels = [*vision.level_dims, vision.out_dim]
    else:
        backbone = SamBackbone(sam.vision_encoder, b.image_size, b.resize)
        channels = backbone.out_channels
    neck = FeatureNeck(channels, d.dim) if d.neck else None
    if neck is None and channels[-1] != d.dim:
        raise ConfigError(f"mask_decoder.neck=false needs a {d.dim}-channel backbone, got {channels}")
    if d.kind == "sam":
        decoder = PromptedMaskDecoder(
            d,
            decoder=sam.mask_decoder.float(),
            pos_embed=sam.shared_image_embedding.float(),
            no_mask_embed=sam.prompt_encoder.no_mask_embed.float(),
        )
        decoder.pos_embed.positional_embedding.requires_grad_(False)
    else:
        decoder = PromptedMaskDecoder(d)
    return backbone, neck, decoder


def build_projector(
    cfg: ProjectorConfig, in_dim: int, level_dims: Sequence[int], out_dim: int, grid: int
) -> Projector:
    """Assemble the projector ``cfg.kind`` for encoder width ``in_dim``, earlier-level widths ``level_dims``
    (oldest first), LLM width ``out_dim`` and the encoder's nominal ``grid`` side."""
    cfg.validate()
    if cfg.kind == "mlp":
        return MLPProjector(in_dim, out_dim)
    if cfg.kind == "avgpool":
        return AvgPoolProjector(in_dim, out_dim, cfg.rho)
    if cfg.kind == "ldpv2":
        return LDPv2Projector(in_dim, out_dim, cfg.rho)
    if cfg.kind == "resampler":
        queries = cfg.num_queries if cfg.num_queries is not None else pooled_side(grid, cfg.rho) ** 2
        return ResamplerProjector(in_dim, out_dim, queries, cfg.heads, cfg.resampler_layers, cfg.ffn_ratio)
    if cfg.refine == "multi" and len(level_dims) != cfg.n_levels:
        raise ConfigError(f"LTC refine='multi' needs {cfg.n_levels} level widths, got {list(level_dims)}")
    return LTC(cfg, in_dim, list(level_dims), out_dim)


def llava_projector(llava: Any) -> nn.Module | None:
    """LLaVA's pretrained ``multi_modal_projector`` (Linear-GELU-Linear), or None when there is none."""
    if llava is None:
        return None
    found = getattr(llava, "multi_modal_projector", None)
    if found is None:  # transformers >= 4.52 keeps it on the inner LlavaModel
        found = getattr(getattr(llava, "model", None), "multi_modal_projector", None)
    return found if isinstance(found, nn.Module) else None


def init_projector_from_llava(projector: Projector, llava: Any) -> bool:
    """Start Ψ from LLaVA's projector (``projector.init_from_llava``, OURS): the LTC via
    :meth:`LTC.start_from_mlp` (its final MLP copied, residual branches zeroed), ``mlp`` / ``avgpool`` by
    copying it into their MLP. Returns whether anything was copied (False without a LLaVA projector and for
    ``resampler`` / ``ldpv2``)."""
    source = llava_projector(llava)
    if source is None:
        return False
    act = getattr(getattr(llava, "config", None), "projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(
            f"LLaVA's projector uses {act!r}, Ψ's MLP uses exact GELU; set projector.init_from_llava=false"
        )
    linear_1, linear_2 = source.linear_1, source.linear_2
    if isinstance(projector, LTC):
        projector.start_from_mlp(linear_1, linear_2)
        return True
    if isinstance(projector, MLPProjector | AvgPoolProjector):
        copy_mlp2x_gelu(projector.mlp, linear_1, linear_2)
        return True
    return False


def build_vmad(
    cfg: VMADConfig | str,
    *,
    llava_path: str | None = None,
    sam_path: str | None = None,
    random_weights: bool = False,
    on_meta: bool | None = None,
    device: str | torch.device | None = None,
) -> VMADModel:
    """Assemble a :class:`VMADModel` from a preset name or a config. Nothing is fetched from a hub.

    ``random_weights``: no pretrained weights (small: random EfficientNet and a SmolLM2-shaped Llama; paper:
    LLaVA-1.5-7B / SAM ViT-H shapes) with the in-code tokenizer; built on the meta device unless
    ``on_meta=False``. The tiny preset is always random (seeded by ``cfg.seed``)."""
    cfg = preset_config(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    if llava_path is not None:
        cfg.llava_path = str(llava_path)
    if sam_path is not None:
        cfg.sam_path = str(sam_path)
    cfg.validate()
    if cfg.seg_head.out_dim != cfg.mask_decoder.dim:
        raise ConfigError(
            f"seg_head.out_dim ({cfg.seg_head.out_dim}) must equal mask_decoder.dim ({cfg.mask_decoder.dim})"
        )
    random_weights = random_weights and cfg.preset != "tiny"
    meta = random_weights if on_meta is None else (on_meta and random_weights)
    llava = None
    if not random_weights and (cfg.vision.kind == "clip" or cfg.llm.kind == "llava"):
        from transformers import LlavaForConditionalGeneration

        folder = check_local_folder(
            cfg.llava_path, "LLaVA-1.5-7B (e.g. llava-hf/llava-1.5-7b-hf)", "llava_path"
        )
        llava = LlavaForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, dtype=DTYPES[cfg.llm.dtype]
        )
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), ctx:
        torch.manual_seed(cfg.seed)
        vision = _vision(cfg, random_weights, llava)
        llm, tokenizer = _llm(cfg, random_weights, llava, cfg.llava_path)
        if cfg.llm.kind != "tiny" and not meta:
            llm = llm.to(DTYPES[cfg.llm.dtype])
        levels = vision.level_dims[len(vision.level_dims) - cfg.projector.n_levels :]
        hidden = llm.get_input_embeddings().weight.shape[1]
        projector = build_projector(cfg.projector, vision.out_dim, levels, hidden, vision.grid)
        from_llava = cfg.projector.init_from_llava and init_projector_from_llava(projector, llava)
        seg_head = SegHead(hidden, cfg.seg_head.out_dim, cfg.seg_head.hidden)
        backbone, neck, decoder = _backbone_and_decoder(cfg, vision, random_weights)
        model = VMADModel(cfg, vision, projector, llm, tokenizer, seg_head, backbone, neck, decoder)
    model.projector_init = "llava_multi_modal_projector" if from_llava else "random"
    if device is not None and not meta:
        model.to(device)
    model.eval()
    return model


def load_pretrained(path: str | Path, **build_kwargs: Any) -> VMADModel:
    """A saved model folder (:func:`vmad.model.weights_io.save_trainable`, e.g. training's ``final/``):
    the base rebuilt from its config (``build_kwargs`` go to :func:`build_vmad`, e.g. local paths), then the
    trained parts loaded on top."""
    meta = weights_io.read_meta(path)  # a VMADError naming config.json when it cannot be used
    where = Path(path) / weights_io.CONFIG_NAME
    try:  # sizes are bounded here, before anything is allocated
        cfg = VMADConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: invalid model config ({exc})") from None
    try:
        model = build_vmad(cfg, **build_kwargs)
    except VMADError:
        raise
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, AssertionError) as exc:
        raise ConfigError(f"{where}: the model it describes cannot be built ({exc})") from None
    model.load_trainable(path)
    return model

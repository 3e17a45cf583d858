"""DSSL's L_pbsd as a training loss of VMAD (paper Sec. III-C, Eq. 8-17), computed from the model's output.

:class:`DSSLLoss` holds :class:`vmad.model.dssl.DSSL` (heads, Meta-Net, memory) and is called by
:class:`vmad.train.losses.VMADLoss` with the model, the batch and the :class:`~vmad.model.outputs.VMADOutput`;
it returns the unweighted L_pbsd (the weight is ``model.loss.pbsd``, Eq. 7). Per batch:

- f: the frozen visual backbone's last feature map (``VMADModel.backbone_maps``; the shared encoder maps for
  the small preset), no gradient;
- boxes: ``N_b`` random boxes drawn from this module's own seeded generator (its state is checkpointed) in
  the frame of the vision encoder's input (``vision.image_size`` px; OURS: the paper's 32 px boxes refer to
  the 336 px CLIP input);
- T_v (Eq. 12): ``roi`` (OURS, default here) ROI-aligns Ψ's output tokens, seen as a grid; ``crop`` (paper)
  re-encodes each cropped patch with F_I then Ψ (gradient reaches Ψ in both);
- Ψ(z_F) (Eq. 13): the mean of Ψ's output tokens of the image (OURS);
- t_x: the mean of the LLM's (frozen) input embeddings of the class's normal description (OURS).

g_alpha / g_beta only ever see detached features (the visual side of Eq. 17 is detached), so they receive
no gradient: the teacher is frozen here, which also keeps DDP from waiting for gradients. What it is follows
``dssl.teacher`` (OURS; :mod:`vmad.model.dssl`): by default none (``identity``: p(z | v^j) ranks the memory by
the cosine similarity of the backbone features), or one shared fixed projection, or the earlier two separate
random heads (``separate``, which do not track visual similarity; ablation / old checkpoints).
The memory queues and the box generator are not module state: save them with
:meth:`DSSLLoss.extra_state` and restore with :meth:`DSSLLoss.load_extra_state`.

Several processes (OURS, ``dssl.gather_memory``, on by default there): every push to the memory (after each
batch's loss, and in the prefill) is all-gathered over the processes (:func:`all_gather_entries`), so every
rank queues the same entries in the same order (rank 0's batch, then rank 1's, ...) and the ranks' memories,
and their checkpoint files, are identical. Only the memory is shared: each rank's loss is computed from its
own batch (its gradient reaches its own Ψ / Meta-Net outputs; DDP averages the gradients), against the
shared, detached memory. Off, each rank's memory holds only its own samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.errors import ConfigError
from vmad.model.dssl import DSSL, DSSLConfig, sample_boxes
from vmad.model.layers import tokens_to_map
from vmad.model.outputs import EncodedImages, VMADOutput


def backbone_channels(model: Any) -> int:
    """Channels of f, the last map of :meth:`VMADModel.backbone_maps`."""
    if model.visual_backbone is None:
        return int(model.vision_encoder.out_dim)
    return int(model.visual_backbone.out_channels[-1])


def token_width(model: Any) -> int:
    return int(model.base_lm().get_input_embeddings().weight.shape[1])


def all_gather_entries(
    class_names: list[str], is_normal: Tensor, z: Tensor, theta: Tensor
) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """The memory entries every process of the default ``torch.distributed`` group pushes at this point,
    concatenated in rank order (a :class:`~vmad.model.dssl.DSSLMemory` ``exchange``; a collective: every rank
    must call it at the same point). ``z [n, Dz]`` and ``theta [n, Dt]`` float32, ``is_normal [n]``; ranks may
    push different ``n``. The tensors travel bit-exactly (one float32 all-gather on their device, the bools
    as 0 / 1), the class names as Python objects."""
    import torch.distributed as dist

    world = dist.get_world_size()
    names: list[list[str] | None] = [None] * world
    dist.all_gather_object(names, list(class_names))
    counts = [len(n or ()) for n in names]
    dz = z.shape[1]
    flags = is_normal.to(z.device, torch.float32)[:, None]
    rows = torch.cat((z.float(), theta.float().to(z.device), flags), dim=1)
    padded = rows.new_zeros(max(counts), rows.shape[1])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    rows = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
    every = [c for n in names for c in (n or ())]
    return every, rows[:, -1] > 0.5, rows[:, :dz], rows[:, dz:-1]


class DSSLLoss(nn.Module):
    """L_pbsd of a VMAD model's output (Eq. 17).

    Args:
        model: the VMAD model (read for shapes only; each call gets it again).
        cfg: DSSL hyper-parameters.
        class_sizes: training samples per class (queue length = 1/``capacity_divisor`` of each class).
        seed: seed of the box generator.
        processes: training processes (``torch.distributed`` initialised when > 1); with several and
            ``cfg.gathers_memory(processes)``, the memory is all-gathered (:func:`all_gather_entries`).
    """

    def __init__(
        self,
        model: Any,
        cfg: DSSLConfig,
        class_sizes: Mapping[str, int],
        seed: int = 0,
        processes: int = 1,
    ) -> None:
        super().__init__()
        width = token_width(model)
        self.frame = int(model.config.vision.image_size)
        if cfg.patch_tokens == "crop" and cfg.crop_input_size is None:  # the encoder's own input size
            cfg = dataclasses.replace(cfg, crop_input_size=self.frame)
        self.cfg = cfg
        self.dssl = DSSL(cfg, backbone_channels(model), width, width, class_sizes)
        if cfg.gathers_memory(processes):
            self.dssl.memory.exchange = all_gather_entries
        for head in self.dssl.teacher_modules():
            head.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(int(seed))
        if cfg.patch_tokens == "roi":
            grid = model.vision_encoder.grid
            side = math.isqrt(int(model.projector.num_output_tokens(grid)))
            if side * side != int(model.projector.num_output_tokens(grid)) or model.config.projector.kind in (
                "resampler",
            ):
                raise ConfigError(
                    f"dssl.patch_tokens='roi' needs a projector with a square token grid; "
                    f"{model.config.projector.kind!r} has none: use dssl.patch_tokens='crop'"
                )

    # ------------------------------------------------------------------ pieces
    def feature_map(self, model: Any, encoded: EncodedImages) -> Tensor:
        return model.backbone_maps(encoded)[-1].float()

    def describe(self, model: Any, texts: Sequence[str], device: torch.device) -> Tensor:
        """t_x: mean LLM input embedding of each normal description ``[B, D]`` (no gradient)."""
        tok = model.tokenizer
        cache = {}
        for t in dict.fromkeys(texts):
            ids = tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            with torch.no_grad():
                cache[t] = model.embed_tokens(torch.tensor(ids, device=device)).float().mean(0)
        return torch.stack([cache[t] for t in texts])

    def patch_tokens(self, model: Any, images: Tensor, vis: Tensor, boxes: Tensor) -> Tensor:
        if self.cfg.patch_tokens == "crop":
            size = (self.frame, self.frame)
            frame = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
            encode = lambda x: model.encode_images(x).visual_tokens  # noqa: E731
            return self.dssl.patch_tokens(boxes, images=frame, encode=encode)
        grid = tokens_to_map(vis)
        return self.dssl.patch_tokens(boxes, token_grid=grid.float(), stride=self.frame / grid.shape[-1])

    # ------------------------------------------------------------------ loss
    def forward(self, model: Any, batch: Mapping[str, Any], output: VMADOutput) -> Tensor:
        """Unweighted L_pbsd of the batch (Eq. 11-17); pushes the batch into the memory."""
        for key in ("class_names", "is_normal", "normal_descriptions"):
            if key not in batch:
                raise ConfigError(f"DSSL needs batch[{key!r}] (use vmad.train.dataset.collate)")
        encoded = output.encoded
        images, vis = encoded.images, encoded.visual_tokens
        boxes = sample_boxes(images.shape[0], self.frame, self.cfg, self.generator, vis.device)
        out = self.dssl(
            self.feature_map(model, encoded),
            self.frame,
            boxes,
            self.patch_tokens(model, images, vis, boxes),
            vis.float().mean(1),
            self.describe(model, batch["normal_descriptions"], vis.device),
            list(batch["class_names"]),
            batch["is_normal"],
        )
        return out.loss

    @torch.no_grad()
    def push_only(self, model: Any, batch: Mapping[str, Any]) -> None:
        """Add a batch's (z, theta) to the memory without a loss (memory prefill, OURS)."""
        encoded = model.encode_images(batch["images"])
        vis = encoded.visual_tokens
        f = self.feature_map(model, encoded)
        z = self.dssl.global_embeddings(f)
        t_x = self.describe(model, batch["normal_descriptions"], vis.device)
        theta = self.dssl.semantic_tokens(vis.float().mean(1), t_x)
        self.dssl.memory.push(list(batch["class_names"]), batch["is_normal"], z, theta)

    def memory_full(self, class_names: Sequence[str]) -> bool:
        mem = self.dssl.memory
        return all(
            name in mem.queues and mem.queues[name].count >= mem.queues[name].capacity for name in class_names
        )

    # ------------------------------------------------------------------ checkpoint state
    def extra_state(self) -> dict[str, Tensor]:
        """Memory queues and box-generator state as flat tensors (safetensors)."""
        state = {f"memory.{k}": v for k, v in self.dssl.memory.state_dict().items()}
        state["generator"] = self.generator.get_state()
        return state

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        mem = {k.removeprefix("memory."): v for k, v in state.items() if k.startswith("memory.")}
        self.dssl.memory.load_state_dict(mem)
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())

"""Defect-Sensitive Structure Learning (DSSL, paper Sec. III-C, Eq. 8-17).

For each image, ``N_b`` random boxes give local visual embeddings ``v^j = g_alpha(ROI(f; B_j))`` (Eq. 8)
and patch tokens ``T_v^j`` in LLM space (Eq. 12); the image gives a global visual embedding
``z = g_beta(GAP(f))`` (Eq. 9) and a semantic token ``theta = Psi(z_F) + Meta(t_x)`` (Eq. 13). A per-class
FIFO memory holds ``z`` and ``theta`` of earlier samples (normal and abnormal, same samples in the same order;
Eq. 10, 14, 15), its normal entries being the positives. The PBSD loss (Eq. 17) is the cross-entropy between
the visual distribution ``p(z_t | v^j)`` (Eq. 11, detached) and the text-visual distribution
``p(theta_t | T_v^j)`` (Eq. 16, whose denominator uses ``T_v^j``: the ``v^j`` printed there is a typo),
summed over the positives and averaged over boxes.

This module receives tensors and callables only (feature maps, tokens, an encoder function): the caller owns
the vision encoder ``F_I``, the projector ``Psi``, the visual backbone and the LLM embedding of the normal
description. The memory is not part of ``DSSL.state_dict()`` (its shapes vary): save
``dssl.memory.state_dict()`` alongside the weights.

The teacher g_alpha / g_beta (OURS, ``DSSLConfig.teacher``). Eq. 17 detaches the visual side, so nothing
trains g_alpha / g_beta; p(z | v^j) (Eq. 11) only means "which memory images look like this patch" if the two
heads map visually similar features to nearby vectors. Two independently initialised random heads do not
(``separate``: on real EfficientNet-Lite0 features of examples/images/ the Spearman correlation between
cos(ROI(f), GAP(f)) and the logits v . z is -0.48 to +0.14 over 10 seeds: PBSD then distils noise).
Both sides therefore go through ONE frozen map, g_alpha = g_beta: ``identity`` (default) = no projection,
v = ROI(f) / |ROI(f)| and z = GAP(f) / |GAP(f)|, so Eq. 11 ranks the memory by exactly the cosine similarity
of the backbone features (correlation 1); ``shared`` = one fixed random projection with orthonormal rows to
``head_dim`` (Johnson-Lindenstrauss: cosines approximately kept; Spearman 0.91 / 0.89 at 56 / 32 of the small
preset's 112 channels, 1 when ``head_dim`` >= C), for backbones too wide to queue. ``separate`` is the
earlier two-head teacher, kept for ablation and to resume checkpoints written with it (training configs
saved before this field existed resolve to it: :meth:`DSSLConfig.upgrade_legacy`).

Choices the paper leaves open are marked OURS here and in :class:`DSSLConfig`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.config import check_choices, from_mapping, to_dict
from vmad.errors import ConfigError
from vmad.model.roi import crop_patches, roi_tokens
from vmad.tensor_io import save_safetensors

PatchTokenMode = Literal["crop", "roi"]
PATCH_TOKEN_MODES: tuple[str, ...] = get_args(PatchTokenMode)
Teacher = Literal["identity", "shared", "separate"]
TEACHERS: tuple[str, ...] = get_args(Teacher)
# Every field a saved DSSL config had before ``teacher`` existed (then the two-head teacher, ``separate``).
PRE_TEACHER_FIELDS: frozenset[str] = frozenset(
    (
        "num_boxes",
        "box_size",
        "tau",
        "head_hidden",
        "head_dim",
        "meta_ratio",
        "capacity_divisor",
        "min_capacity",
        "default_capacity",
        "patch_tokens",
        "crop_input_size",
        "roi_output_size",
        "roi_sampling_ratio",
        "normalize_tokens",
        "include_current",
        "include_self",
    )
)
SHARED_PROJECTION_SEED = 0  # OURS: the seed of the ``shared`` teacher's fixed projection
# What a memory's ``exchange`` hook maps (class names, is_normal, z, theta) of one push to: the entries every
# process pushes at this point, in rank order (:func:`vmad.train.dssl_loss.all_gather_entries`).
Exchange = Callable[[list[str], Tensor, Tensor, Tensor], tuple[list[str], Tensor, Tensor, Tensor]]


@dataclass
class DSSLConfig:
    """DSSL hyper-parameters. Fields marked OURS are not given by the paper.

    Attributes:
        num_boxes: N_b, random patch boxes per image (paper: 32, Table IV).
        box_size: side of each square box in input-image pixels (paper: 32 x 32).
        tau: temperature of Eq. 11 and Eq. 16 (OURS: 0.07, MoCo's).
        teacher: OURS. What g_alpha / g_beta (Eq. 8-9) are; frozen in every case (Eq. 17 detaches them):
            ``identity`` (default): no projection, v and z are the L2-normalised ROI-pooled / GAP backbone
            features (z has the backbone's C channels), so p(z | v^j) ranks the memory by their cosine
            similarity; ``shared``: g_alpha = g_beta = one fixed random projection with orthonormal rows to
            min(head_dim, C), L2-normalised (cosines approximately kept); ``separate``: two independent random
            Linear-ReLU-Linear heads (the earlier default; their p(z | v^j) does not track visual
            similarity, kept for ablation and for resuming checkpoints written with it). See the module
            docstring.
        head_hidden: hidden width of the ``separate`` heads (OURS: 512).
        head_dim: output width of the ``shared`` projection and the ``separate`` heads (OURS: 128).
        meta_ratio: Meta-Net bottleneck ratio, hidden = max(1, D_t // meta_ratio) (OURS: 16, CoCoOp's).
        capacity_divisor: the memory keeps 1/capacity_divisor of each class's samples (paper: 20).
        min_capacity: lower bound of a class's queue length (OURS: 8).
        default_capacity: queue length of a class first seen at ``push`` without a registered size (OURS: 32).
        patch_tokens: ``crop`` = re-encode the cropped patches with F_I then Psi (paper, Eq. 12);
            ``roi`` = ROI-align on a token grid the caller already has (OURS, cheaper; see
            :meth:`DSSL.patch_tokens`).
        crop_input_size: side the crops are resampled to before F_I in ``crop`` mode (the encoder's input
            size; None keeps ``box_size``).
        roi_output_size: S, bins per side of the ROI-align (OURS: 2; a 32 px box covers 2 x 2 cells at
            stride 16).
        roi_sampling_ratio: bilinear samples per bin and side (OURS: 2).
        normalize_tokens: L2-normalise T_v and theta before the dot products of Eq. 16 (OURS: True; the paper
            normalises only the visual side, LLM-space vectors are otherwise unbounded at tau = 0.07).
        include_current: OURS. The current batch's entries (its z and its theta WITH gradient) join M_img /
            M_txt for this step, so Meta-Net receives gradient (memory entries are stored detached).
        include_self: OURS. With ``include_current``, whether an image's own entry is among its candidates
            (default False: the paper's premise is that normal patches find parallels in OTHER samples).
        gather_memory: OURS (the paper is silent). With several training processes, push the entries
            (class, is_normal, z, theta) of every process's batch into every process's memory, all-gathered
            in rank order, so all ranks hold the same queues; the loss still takes its gradient from the
            rank's own batch only (memory entries are detached). None (default) = on when there are several
            processes; false = each rank's memory holds only the samples it saw itself (the behaviour before
            this field existed: saved configs without it resolve to false, :meth:`upgrade_legacy`). No effect
            in one process (:meth:`gathers_memory`).

    λ_pbsd, the weight of L_pbsd in the total loss (Eq. 7), is ``model.loss.pbsd``
    (:class:`vmad.model.config.LossConfig`).
    """

    num_boxes: int = 32
    box_size: int = 32
    tau: float = 0.07
    teacher: Teacher = "identity"
    head_hidden: int = 512
    head_dim: int = 128
    meta_ratio: int = 16
    capacity_divisor: int = 20
    min_capacity: int = 8
    default_capacity: int = 32
    patch_tokens: PatchTokenMode = "crop"
    crop_input_size: int | None = None
    roi_output_size: int = 2
    roi_sampling_ratio: int = 2
    normalize_tokens: bool = True
    include_current: bool = True
    include_self: bool = False
    gather_memory: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value."""
        check_choices(self, "dssl")
        for name in (
            "num_boxes",
            "box_size",
            "head_hidden",
            "head_dim",
            "meta_ratio",
            "capacity_divisor",
            "min_capacity",
            "default_capacity",
            "roi_output_size",
            "roi_sampling_ratio",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"dssl.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.tau > 0:
            raise ConfigError(f"dssl.tau must be > 0, got {self.tau}")
        if self.crop_input_size is not None and self.crop_input_size < 1:
            raise ConfigError(f"dssl.crop_input_size must be >= 1 or null, got {self.crop_input_size}")

    def capacity_for(self, class_size: int) -> int:
        """Queue length for a class of ``class_size`` training samples: max(min_capacity, ceil(size / 20))."""
        return max(self.min_capacity, math.ceil(class_size / self.capacity_divisor))

    def gathers_memory(self, processes: int) -> bool:
        """Whether the memory is all-gathered over ``processes`` training processes (``gather_memory``)."""
        return resolve_gather_memory(self.gather_memory, processes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DSSLConfig:
        return from_mapping(cls, data, "dssl")

    @staticmethod
    def upgrade_legacy(section: Mapping[str, Any]) -> dict[str, Any]:
        """A ``dssl`` section as saved by an earlier version, in today's shape. A saved section lists every
        field (``to_dict``), so one holding all of :data:`PRE_TEACHER_FIELDS` was saved by a training run:
        without ``teacher`` it was trained with the two-head teacher and gets ``teacher: separate``; without
        ``gather_memory`` (saved before that field existed) each rank's memory held only its own samples,
        and it gets ``gather_memory: false``. A hand-written section (a YAML file listing only what it
        changes) is left alone and gets the current defaults."""
        out = dict(section)
        if PRE_TEACHER_FIELDS <= out.keys():
            out.setdefault("teacher", "separate")
            out.setdefault("gather_memory", False)
        return out


def resolve_gather_memory(value: bool | None, processes: int) -> bool:
    """``dssl.gather_memory`` as it acts with ``processes`` training processes: None = on when several."""
    return processes > 1 and (value is None or bool(value))


def sample_boxes(
    batch: int,
    image_size: int | tuple[int, int],
    cfg: DSSLConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[batch, N_b, 4]`` random square boxes ``(x1, y1, x2, y2)`` in pixels, inside the image.

    Side ``min(box_size, H, W)``; top-left corners uniform over integer pixels (OURS: integer offsets, boxes
    may overlap). Drawn on the CPU from ``generator``: a seeded generator gives the same boxes on any device.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    side = min(cfg.box_size, h, w)
    n = cfg.num_boxes
    x1 = torch.randint(0, w - side + 1, (batch, n), generator=generator)
    y1 = torch.randint(0, h - side + 1, (batch, n), generator=generator)
    boxes = torch.stack((x1, y1, x1 + side, y1 + side), dim=-1).to(torch.float32)
    return boxes if device is None else boxes.to(device)


class ProjectionHead(nn.Module):
    """g_alpha (Eq. 8) / g_beta (Eq. 9) of the ``separate`` teacher: Linear-ReLU-Linear, L2-normalised output
    (OURS: the MLP shape)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)


class L2Normalize(nn.Module):
    """g_alpha = g_beta of the ``identity`` teacher: ``x / |x|``, no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class FixedProjection(nn.Module):
    """g_alpha = g_beta of the ``shared`` teacher: ``x -> W x / |W x|``, ``W [k, C]`` with orthonormal rows,
    k = min(out_dim, C), from the QR of a seeded Gaussian matrix (a random k-dim subspace: inner products and
    cosines approximately kept, exactly when k = C). ``W`` is a buffer: no gradient, saved with the state dict
    (so a resumed run uses the same W wherever QR is computed)."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = SHARED_PROJECTION_SEED) -> None:
        super().__init__()
        k = min(in_dim, out_dim)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=gen, dtype=torch.float64))
        self.register_buffer("weight", q.T.contiguous().float())

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(F.linear(x, self.weight.to(x.dtype)), dim=-1)


class MetaNet(nn.Module):
    """Meta-Net of Eq. 13: Linear-ReLU-Linear bottleneck, embedded normal description t_x -> pi (LLM width).

    OURS: t_x is the mean of the LLM's input embeddings of the description's tokens (computed by the caller).
    """

    def __init__(self, text_dim: int, out_dim: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(1, text_dim // ratio)
        self.net = nn.Sequential(
            nn.Linear(text_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, t_x: Tensor) -> Tensor:
        return self.net(t_x)


class _Queue:
    """One class's ring buffer ``z [cap, Dz]``, ``theta [cap, Dt]``, ``normal [cap]``; ``ptr``: next write."""

    def __init__(self, capacity: int, z_dim: int, theta_dim: int, device: torch.device | None = None) -> None:
        self.capacity = capacity
        self.z = torch.zeros(capacity, z_dim, device=device)
        self.theta = torch.zeros(capacity, theta_dim, device=device)
        self.normal = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.count = 0
        self.ptr = 0

    def push(self, z: Tensor, theta: Tensor, normal: Tensor) -> None:
        """Append rows in order, overwriting the oldest once full (first-in, first-out)."""
        for i in range(z.shape[0]):
            self.z[self.ptr] = z[i]
            self.theta[self.ptr] = theta[i]
            self.normal[self.ptr] = normal[i]
            self.ptr = (self.ptr + 1) % self.capacity
            self.count = min(self.count + 1, self.capacity)

    def ordered(self) -> tuple[Tensor, Tensor, Tensor]:
        """Filled entries, oldest first."""
        if self.count < self.capacity:
            idx = torch.arange(self.count, device=self.z.device)
        else:
            idx = (torch.arange(self.capacity, device=self.z.device) + self.ptr) % self.capacity
        return self.z[idx], self.theta[idx], self.normal[idx]


class DSSLMemory:
    """Per-class FIFO queues of (z, theta, is_normal) for the same samples in the same order (Eq. 10, 14, 15).

    M_img / M_txt are a class's entries, P_img / P_txt its normal ones. Entries are stored detached, float32.
    ``capacities`` gives each class's queue length (see :meth:`DSSLConfig.capacity_for`); a class first seen
    at :meth:`push` gets ``default_capacity`` (OURS). ``exchange`` (OURS, ``DSSLConfig.gather_memory``; None =
    off): a function that :meth:`push` passes its entries through before queueing them, e.g. an all-gather
    over the training processes, so that every rank queues every rank's entries in the same order.
    """

    VERSION = 1

    def __init__(
        self,
        z_dim: int,
        theta_dim: int,
        capacities: Mapping[str, int] | None = None,
        default_capacity: int = 32,
    ) -> None:
        self.z_dim = z_dim
        self.theta_dim = theta_dim
        self.default_capacity = default_capacity
        self.capacities: dict[str, int] = {}
        self.queues: dict[str, _Queue] = {}
        self.exchange: Exchange | None = None
        for name, cap in (capacities or {}).items():
            if cap < 1:
                raise ConfigError(f"memory capacity of class {name!r} must be >= 1, got {cap}")
            self.capacities[name] = int(cap)

    @classmethod
    def from_class_sizes(
        cls, class_sizes: Mapping[str, int], cfg: DSSLConfig, z_dim: int, theta_dim: int
    ) -> DSSLMemory:
        """Queues of ``cfg.capacity_for(size)`` entries per class (paper: 1/20 of each class)."""
        caps = {name: cfg.capacity_for(size) for name, size in class_sizes.items()}
        return cls(z_dim, theta_dim, caps, cfg.default_capacity)

    def _queue(self, name: str, device: torch.device) -> _Queue:
        if name not in self.queues:
            cap = self.capacities.setdefault(name, self.default_capacity)
            self.queues[name] = _Queue(cap, self.z_dim, self.theta_dim, device)
        return self.queues[name]

    def push(
        self, class_names: Sequence[str], is_normal: Tensor | Sequence[bool], z: Tensor, theta: Tensor
    ) -> None:
        """Append one entry per sample (batch order) to its class's queue; evicts the oldest when full. With
        ``exchange`` set, the entries it returns (every process's, in rank order) are appended instead."""
        if len(class_names) != z.shape[0] or z.shape[0] != theta.shape[0]:
            raise ValueError(
                f"push: {len(class_names)} names, z {tuple(z.shape)}, theta {tuple(theta.shape)}"
            )
        normal = torch.as_tensor(is_normal, dtype=torch.bool).reshape(-1)
        z = z.detach().float()
        theta = theta.detach().float()
        if self.exchange is not None:
            class_names, normal, z, theta = self.exchange(list(class_names), normal, z, theta)
        for name in dict.fromkeys(class_names):  # classes in first-appearance order
            rows = [i for i, c in enumerate(class_names) if c == name]
            q = self._queue(name, z.device)
            idx = torch.tensor(rows, device=z.device)
            q.push(z[idx].to(q.z.device), theta[idx].to(q.z.device), normal[rows].to(q.z.device))

    def get(self, class_name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(z_mem [M, Dz], theta_mem [M, Dt], is_normal [M])``, oldest first; empty for an unseen class."""
        q = self.queues.get(class_name)
        if q is None:
            empty = torch.zeros(0, dtype=torch.bool)
            return torch.zeros(0, self.z_dim), torch.zeros(0, self.theta_dim), empty
        return q.ordered()

    def __len__(self) -> int:
        return sum(q.count for q in self.queues.values())

    def gather(
        self, class_names: Sequence[str], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Padded per-image memories: ``z [B, M, Dz]``, ``theta [B, M, Dt]``, ``is_normal``, ``valid``."""
        per = [self.get(c) for c in class_names]
        m = max((p[0].shape[0] for p in per), default=0)
        bsz = len(class_names)
        z = torch.zeros(bsz, m, self.z_dim, device=device)
        th = torch.zeros(bsz, m, self.theta_dim, device=device)
        normal = torch.zeros(bsz, m, dtype=torch.bool, device=device)
        valid = torch.zeros(bsz, m, dtype=torch.bool, device=device)
        for i, (zi, ti, ni) in enumerate(per):
            k = zi.shape[0]
            z[i, :k], th[i, :k], normal[i, :k] = zi.to(device), ti.to(device), ni.to(device)
            valid[i, :k] = True
        return z, th, normal, valid

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (safetensors-compatible): full ring buffers ``q{i}.z|theta|normal`` plus ``meta``, the
        JSON metadata (class names in order, capacities, counts, write pointers) as a uint8 tensor."""
        meta = {
            "version": self.VERSION,
            "z_dim": self.z_dim,
            "theta_dim": self.theta_dim,
            "default_capacity": self.default_capacity,
            "capacities": self.capacities,
            "queues": [{"name": n, "count": q.count, "ptr": q.ptr} for n, q in self.queues.items()],
        }
        out: dict[str, Tensor] = {"meta": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
        for i, q in enumerate(self.queues.values()):
            out[f"q{i}.z"] = q.z.detach().cpu().clone()
            out[f"q{i}.theta"] = q.theta.detach().cpu().clone()
            out[f"q{i}.normal"] = q.normal.detach().cpu().to(torch.uint8)
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], device: torch.device | str | None = None) -> None:
        """Restore exactly what :meth:`state_dict` wrote (queues, their order and pointers)."""
        meta = json.loads(bytes(state["meta"].tolist()).decode())
        if meta.get("version") != self.VERSION:
            raise ConfigError(f"unsupported DSSL memory state version {meta.get('version')!r}")
        if meta["z_dim"] != self.z_dim or meta["theta_dim"] != self.theta_dim:
            raise ConfigError(
                f"DSSL memory dims {meta['z_dim']}/{meta['theta_dim']} "
                f"!= expected {self.z_dim}/{self.theta_dim}"
            )
        self.default_capacity = int(meta["default_capacity"])
        self.capacities = {k: int(v) for k, v in meta["capacities"].items()}
        self.queues = {}
        for i, info in enumerate(meta["queues"]):
            z = state[f"q{i}.z"]
            q = _Queue(z.shape[0], self.z_dim, self.theta_dim, torch.device(device) if device else None)
            q.z.copy_(z)
            q.theta.copy_(state[f"q{i}.theta"])
            q.normal.copy_(state[f"q{i}.normal"].bool())
            q.count, q.ptr = int(info["count"]), int(info["ptr"])
            self.queues[info["name"]] = q

    def save(self, path: str) -> None:
        """Write the state as a safetensors file (metadata JSON also in the file header)."""
        state = self.state_dict()
        save_safetensors(path, state, metadata={"dssl_memory": bytes(state["meta"].tolist()).decode()})

    def load(self, path: str, device: torch.device | str | None = None) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(path), device)


def pbsd_loss(
    v: Tensor,
    patch_tokens: Tensor,
    z_mem: Tensor,
    theta_mem: Tensor,
    is_normal: Tensor,
    valid: Tensor,
    tau: float,
) -> Tensor:
    """Per-image PBSD loss (Eq. 11, 16, 17) -> ``[B]``; vectorised over boxes and memory.

    Args:
        v: local visual embeddings ``[B, N_b, Dz]`` (their distribution is computed detached).
        patch_tokens: T_v ``[B, N_b, Dt]``.
        z_mem, theta_mem: each image's candidates ``[B, M, Dz]`` / ``[B, M, Dt]`` (same entries, same order).
        is_normal: ``[B, M]``, positives P. valid: ``[B, M]``, which padded slots are real (M_img / M_txt).
    ``L = 1/N_b sum_j sum_{t in P} -p(z_t|v^j) log p(theta_t|T_v^j)``; an image without a valid positive
    gives 0.
    Computed in at least float32.
    """
    dtype = torch.promote_types(patch_tokens.dtype, torch.float32)
    neg = torch.finfo(dtype).min / 2  # finite, so 0 * masked stays 0
    mask = valid[:, None, :]
    with torch.no_grad():
        logits_v = torch.bmm(v.detach().to(dtype), z_mem.detach().to(dtype).transpose(1, 2)) / tau
        p_v = logits_v.masked_fill(~mask, neg).softmax(dim=-1)  # Eq. 11, [B, N_b, M]
    logits_t = torch.bmm(patch_tokens.to(dtype), theta_mem.to(dtype).transpose(1, 2)) / tau
    log_p_t = logits_t.masked_fill(~mask, neg).log_softmax(dim=-1)  # Eq. 16, [B, N_b, M]
    pos = (is_normal & valid)[:, None, :]
    terms = torch.where(pos, -p_v * log_p_t, torch.zeros((), dtype=dtype, device=log_p_t.device))
    return terms.sum(dim=-1).mean(dim=-1)  # Eq. 17


@dataclass
class DSSLOutput:
    """``loss``: L_pbsd (unweighted, mean over the batch's images, including zeros; the model weights it by
    ``model.loss.pbsd``); ``per_image [B]``; ``has_positive [B]`` (False -> that image contributed 0);
    ``v [B, N_b, Dz]``, ``z [B, Dz]``, ``theta [B, Dt]``."""

    loss: Tensor
    per_image: Tensor
    has_positive: Tensor
    v: Tensor
    z: Tensor
    theta: Tensor


class DSSL(nn.Module):
    """Teacher g_alpha / g_beta, Meta-Net, the per-class memory and the PBSD loss.

    The teacher follows ``cfg.teacher``: ``separate`` registers two heads ``g_alpha`` and ``g_beta`` (state
    dict keys ``g_alpha.net.*``, ``g_beta.net.*``, as in checkpoints written before the other teachers
    existed); ``identity`` and ``shared`` register ONE module ``g`` (``shared``: key ``g.weight``;
    ``identity``: no tensor), which ``g_alpha`` and ``g_beta`` both name.

    Args:
        cfg: :class:`DSSLConfig`.
        feature_dim: C, channels of the (frozen) visual backbone's feature map f.
        token_dim: D, width of the LLM-space tokens (Psi's output).
        text_dim: D_t, width of t_x (default D).
        class_sizes: training samples per class, for the queue lengths (paper: 1/20 of each class).
    """

    def __init__(
        self,
        cfg: DSSLConfig,
        feature_dim: int,
        token_dim: int,
        text_dim: int | None = None,
        class_sizes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.teacher == "separate":
            self.g_alpha = ProjectionHead(feature_dim, cfg.head_hidden, cfg.head_dim)
            self.g_beta = ProjectionHead(feature_dim, cfg.head_hidden, cfg.head_dim)
            self.z_dim = cfg.head_dim
        elif cfg.teacher == "shared":
            self.g = FixedProjection(feature_dim, cfg.head_dim)
            self.z_dim = min(feature_dim, cfg.head_dim)
        else:
            self.g = L2Normalize()
            self.z_dim = feature_dim
        self.meta_net = MetaNet(text_dim or token_dim, token_dim, cfg.meta_ratio)
        self.memory = DSSLMemory.from_class_sizes(class_sizes or {}, cfg, self.z_dim, token_dim)

    def __getattr__(self, name: str) -> Any:
        if name in ("g_alpha", "g_beta") and "g" in self._modules:  # one teacher for both sides
            return self._modules["g"]
        return super().__getattr__(name)

    def teacher_modules(self) -> list[nn.Module]:
        """The distinct modules of g_alpha / g_beta: one (``identity``, ``shared``) or two (``separate``)."""
        return [self.g_alpha] if self.g_alpha is self.g_beta else [self.g_alpha, self.g_beta]

    def _teacher_dtype(self) -> torch.dtype:
        for module in self.teacher_modules():
            for tensor in (*module.parameters(), *module.buffers()):
                return tensor.dtype
        return torch.float32

    # ---- patch tokens T_v (Eq. 12) ----
    def patch_tokens(
        self,
        boxes: Tensor,
        *,
        images: Tensor | None = None,
        encode: Callable[[Tensor], Tensor] | None = None,
        token_grid: Tensor | None = None,
        stride: float | tuple[float, float] | None = None,
        chunk: int | None = None,
    ) -> Tensor:
        """T_v ``[B, N_b, D]`` by ``cfg.patch_tokens``.

        ``crop`` (paper): ``images [B, 3, H, W]`` (the encoder's normalised input) and ``encode`` =
        Psi(F_I(.)), mapping ``[n, 3, s, s]`` to ``[n, M, D]`` or ``[n, D]``; see :func:`crop_patch_tokens`.
        ``roi`` (OURS): ``token_grid [B, D, h, w]`` (Psi's output tokens as a grid) and its ``stride`` (px).
        ``boxes`` and ``images`` / ``stride`` must refer to the same pixel frame (the size the boxes were
        drawn for); maps computed from a resized copy of the image only need the matching stride.
        """
        if self.cfg.patch_tokens == "crop":
            if images is None or encode is None:
                raise ValueError("patch_tokens='crop' needs images and encode")
            size = self.cfg.crop_input_size or self.cfg.box_size
            return crop_patch_tokens(images, boxes, encode, size, chunk)
        if token_grid is None or stride is None:
            raise ValueError("patch_tokens='roi' needs token_grid and stride")
        return roi_tokens(token_grid, boxes, stride, self.cfg.roi_output_size, self.cfg.roi_sampling_ratio)

    def semantic_tokens(self, global_token: Tensor, t_x: Tensor) -> Tensor:
        """theta = Psi(z_F) + Meta(t_x) (Eq. 13), L2-normalised when ``normalize_tokens`` (OURS)."""
        theta = global_token + self.meta_net(t_x.to(self.meta_net.net[0].weight.dtype))
        return F.normalize(theta, dim=-1) if self.cfg.normalize_tokens else theta

    def visual_embeddings(
        self, feature_map: Tensor, boxes: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """``v [B, N_b, Dz]`` (Eq. 8) and ``z [B, Dz]`` (Eq. 9), without gradient (frozen visual side)."""
        stride = (image_size[0] / feature_map.shape[-2], image_size[1] / feature_map.shape[-1])
        with torch.no_grad():
            f = feature_map.detach().to(self._teacher_dtype())
            pooled = roi_tokens(f, boxes, stride, self.cfg.roi_output_size, self.cfg.roi_sampling_ratio)
            return self.g_alpha(pooled), self.global_embeddings(f)

    def global_embeddings(self, feature_map: Tensor) -> Tensor:
        """``z = g_beta(GAP(f))`` ``[B, Dz]`` (Eq. 9) of feature maps ``[B, C, H, W]``, without gradient."""
        with torch.no_grad():
            return self.g_beta(feature_map.detach().to(self._teacher_dtype()).mean(dim=(2, 3)))

    def forward(
        self,
        feature_map: Tensor,
        image_size: int | tuple[int, int],
        boxes: Tensor,
        patch_tokens: Tensor,
        global_token: Tensor,
        t_x: Tensor,
        class_names: Sequence[str],
        is_normal: Tensor | Sequence[bool],
        update_memory: bool | None = None,
    ) -> DSSLOutput:
        """L_pbsd for a batch; then (when ``update_memory``, default ``self.training``) push z, theta FIFO.

        Args:
            feature_map: f ``[B, C, H, W]`` of the frozen visual backbone, for an image of ``image_size`` px.
            boxes: ``[B, N_b, 4]`` pixels (:func:`sample_boxes`). patch_tokens: T_v ``[B, N_b, D]``.
            global_token: Psi(z_F) ``[B, D]``. t_x: ``[B, D_t]``. is_normal: ``[B]`` labels (True = normal).
        """
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        device = patch_tokens.device
        normal = torch.as_tensor(is_normal, dtype=torch.bool, device=device).reshape(-1)
        v, z = self.visual_embeddings(feature_map, boxes, hw)
        theta = self.semantic_tokens(global_token, t_x)
        t_v = F.normalize(patch_tokens, dim=-1) if self.cfg.normalize_tokens else patch_tokens

        z_mem, th_mem, pos_mem, valid_mem = self.memory.gather(class_names, device)
        th_mem = th_mem.to(theta.dtype)
        if self.cfg.include_current:
            bsz = len(class_names)
            ids = {c: i for i, c in enumerate(dict.fromkeys(class_names))}
            cid = torch.tensor([ids[c] for c in class_names], device=device)
            cur_valid = cid[:, None] == cid[None, :]
            if not self.cfg.include_self:
                cur_valid &= ~torch.eye(bsz, dtype=torch.bool, device=device)
            z_mem = torch.cat((z_mem, z.detach().float()[None].expand(bsz, -1, -1)), dim=1)
            th_mem = torch.cat((th_mem, theta[None].expand(bsz, -1, -1)), dim=1)
            pos_mem = torch.cat((pos_mem, normal[None].expand(bsz, -1)), dim=1)
            valid_mem = torch.cat((valid_mem, cur_valid), dim=1)

        per_image = pbsd_loss(v, t_v, z_mem, th_mem, pos_mem, valid_mem, self.cfg.tau)
        loss = per_image.mean()
        has_pos = (pos_mem & valid_mem).any(dim=1)
        do_update = self.training if update_memory is None else update_memory
        if do_update:
            self.memory.push(list(class_names), normal, z.detach(), theta.detach())
        return DSSLOutput(loss, per_image, has_pos, v, z, theta)


def crop_patch_tokens(
    images: Tensor,
    boxes: Tensor,
    encode: Callable[[Tensor], Tensor],
    input_size: int,
    chunk: int | None = None,
) -> Tensor:
    """Paper Eq. 12: T_v^j = Psi(F_I(crop_j)), each crop resampled to ``input_size``; ``encode`` is Psi o F_I.

    A token sequence ``[n, M, D]`` per crop is averaged to one vector (OURS: mean pooling of T_v^j).
    ``chunk`` bounds how many crops go through ``encode`` at once (None: all). -> ``[B, N_b, D]``.
    """
    bsz, n = boxes.shape[:2]
    crops = crop_patches(images, boxes, input_size)
    step = chunk or crops.shape[0]
    outs = []
    for start in range(0, crops.shape[0], step):
        tok = encode(crops[start : start + step])
        outs.append(tok.mean(dim=1) if tok.ndim == 3 else tok)
    return torch.cat(outs).view(bsz, n, -1)

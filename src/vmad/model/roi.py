"""ROI-align on feature maps and image crops with ``torch.nn.functional.grid_sample`` (no torchvision).

Boxes are ``(x1, y1, x2, y2)`` in pixel coordinates of the input image (pixel edges at integers, so a box
``(0, 0, 32, 32)`` covers the first 32 x 32 pixels). A feature map of stride ``s`` has its cell ``i``
centred at pixel ``(i + 0.5) * s`` (the ``aligned=True`` convention of Detectron2 / torchvision's
``roi_align``). Sampling runs in at least float32 (half-precision grid coordinates would be off by cells);
the result has the features' dtype.

Each box is divided into ``S_h x S_w`` bins; each bin is the mean of ``r x r`` bilinear samples placed at
the centres of a regular ``r x r`` sub-grid of the bin (``r`` = ``sampling_ratio``). Samples that fall
between the border of the map and the centre of the edge cells take the edge value (``padding_mode="border"``,
as torchvision clamps there); boxes are expected to lie inside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = tuple[float, float]


def _pair(value: float | int | tuple[float, float] | tuple[int, int]) -> Pair:
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), float(value)


def _check_boxes(x: Tensor, boxes: Tensor) -> None:
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if boxes.shape[0] != x.shape[0]:
        raise ValueError(f"boxes batch {boxes.shape[0]} != feature batch {x.shape[0]}")


def roi_sample_grid(
    boxes: Tensor,
    map_size: tuple[int, int],
    stride: float | tuple[float, float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """``grid_sample`` coordinates (``align_corners=False``) of every sample: ``[B, N, P_h, P_w, 2]`` (x, y).

    ``P = S * sampling_ratio`` per side; sample ``p`` of a box spanning ``[a, b]`` pixels lies at pixel
    ``a + (p + 0.5) * (b - a) / P``, i.e. feature coordinate ``pixel / stride - 0.5``.
    """
    sy, sx = _pair(stride)
    h, w = map_size
    ph, pw = output_size[0] * sampling_ratio, output_size[1] * sampling_ratio
    b = boxes if boxes.is_floating_point() else boxes.to(torch.float32)
    x1, y1, x2, y2 = b.unbind(-1)  # [B, N]
    fy = (torch.arange(ph, device=b.device, dtype=b.dtype) + 0.5) / ph  # fractions of the box height
    fx = (torch.arange(pw, device=b.device, dtype=b.dtype) + 0.5) / pw
    px = x1[..., None] + fx * (x2 - x1)[..., None]  # [B, N, P_w] pixel coordinates
    py = y1[..., None] + fy * (y2 - y1)[..., None]  # [B, N, P_h]
    # feature coordinate u = p / s - 0.5; grid_sample (align_corners=False) wants (2u + 1) / size - 1.
    gx = 2.0 * px / (sx * w) - 1.0
    gy = 2.0 * py / (sy * h) - 1.0
    grid_x = gx[:, :, None, :].expand(-1, -1, ph, pw)
    grid_y = gy[:, :, :, None].expand(-1, -1, ph, pw)
    return torch.stack((grid_x, grid_y), dim=-1)


def roi_align(
    features: Tensor,
    boxes: Tensor,
    stride: float | tuple[float, float],
    output_size: int | tuple[int, int] = 2,
    sampling_ratio: int = 2,
) -> Tensor:
    """ROI-align: ``features [B, C, H, W]``, ``boxes [B, N, 4]`` (pixels) -> ``[B, N, C, S_h, S_w]`` bins.

    ``stride`` is the feature map's stride in pixels (one number, or ``(s_y, s_x)``).
    """
    _check_boxes(features, boxes)
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
    out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    bsz, ch, h, w = features.shape
    n = boxes.shape[1]
    r = sampling_ratio
    dtype = torch.promote_types(features.dtype, torch.float32)
    grid = roi_sample_grid(boxes.to(features.device, dtype), (h, w), stride, out, r)  # [B, N, Ph, Pw, 2]
    ph, pw = grid.shape[2], grid.shape[3]
    grid = grid.reshape(bsz, n * ph, pw, 2)
    samples = F.grid_sample(
        features.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).to(features.dtype)
    samples = samples.view(bsz, ch, n, out[0], r, out[1], r).mean(dim=(4, 6))  # [B, C, N, Sh, Sw]
    return samples.permute(0, 2, 1, 3, 4)


def roi_tokens(
    token_grid: Tensor,
    boxes: Tensor,
    stride: float | tuple[float, float],
    output_size: int | tuple[int, int] = 2,
    sampling_ratio: int = 2,
) -> Tensor:
    """One vector per box: ROI-align ``token_grid [B, D, h, w]`` then average the bins -> ``[B, N, D]``."""
    return roi_align(token_grid, boxes, stride, output_size, sampling_ratio).mean(dim=(3, 4))


def crop_patches(images: Tensor, boxes: Tensor, out_size: int | tuple[int, int]) -> Tensor:
    """Crop every box, resample it bilinearly to ``out_size``: ``[B, 3, H, W]`` -> ``[B * N, 3, s_h, s_w]``.

    Paper Eq. 12, ``I_box = ROI(I_img; B[j])``. One sample per output pixel at its centre, so an integer box
    cropped at its own size reproduces the pixels exactly; when upsampling, the samples near the crop's
    edge interpolate with the real neighbouring image pixels (not a replicated edge).
    """
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    crops = roi_align(images, boxes, stride=1.0, output_size=size, sampling_ratio=1)  # [B, N, 3, s, s]
    return crops.reshape(-1, *crops.shape[2:])

"""DSSL (paper Sec. III-C, Eq. 8-17): ROI-align, boxes, PBSD vs a naive loop, gradient flow, FIFO memory."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from vmad.errors import ConfigError
from vmad.model.dssl import (
    DSSL,
    DSSLConfig,
    DSSLMemory,
    crop_patch_tokens,
    pbsd_loss,
    sample_boxes,
)
from vmad.model.roi import crop_patches, roi_align, roi_tokens

# ---------------------------------------------------------------- ROI-align


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Bilinear value of fmap [C, H, W] at feature coordinates (y, x), clamped to the edge cells' centres."""
    h, w = fmap.shape[-2:]
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return (
        fmap[:, y0, x0] * (1 - ly) * (1 - lx)
        + fmap[:, y0, x1] * (1 - ly) * lx
        + fmap[:, y1, x0] * ly * (1 - lx)
        + fmap[:, y1, x1] * ly * lx
    )


def _naive_roi_mean(fmap: torch.Tensor, box: list[float], stride: float, s: int, r: int) -> torch.Tensor:
    x1, y1, x2, y2 = box
    p = s * r
    acc = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    for iy in range(p):
        for ix in range(p):
            py = y1 + (iy + 0.5) * (y2 - y1) / p
            px = x1 + (ix + 0.5) * (x2 - x1) / p
            acc += _bilinear(fmap, py / stride - 0.5, px / stride - 0.5)
    return acc / (p * p)


def test_roi_align_hand_computed_toy_map() -> None:
    f = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # [1, 1, 2, 2], stride 1
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 1.5, 1.5], [0.0, 0.0, 1.0, 2.0]]])
    # box 0: samples at the four cell centres -> mean 1.5
    assert roi_tokens(f, boxes[:, :1], 1.0, output_size=1, sampling_ratio=2).item() == pytest.approx(1.5)
    # box 1: one sample at the map centre -> bilinear mean of the four cells, 1.5
    assert roi_tokens(f, boxes[:, 1:2], 1.0, output_size=1, sampling_ratio=1).item() == pytest.approx(1.5)
    # box 2: x samples at -0.25 (-> 0, edge) and 0.25, y at 0 and 1: (0 + 0.25 + 2 + 2.25) / 4 = 1.125
    assert roi_tokens(f, boxes[:, 2:3], 1.0, output_size=1, sampling_ratio=2).item() == pytest.approx(1.125)
    # bins: box 0 with 2x2 bins, one sample each, are the four cells themselves
    bins = roi_align(f, boxes[:, :1], 1.0, output_size=2, sampling_ratio=1)
    assert torch.allclose(bins[0, 0, 0], f[0, 0])


def test_roi_align_matches_naive_loop_and_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    stride = 8.0
    boxes = torch.tensor(
        [[[0.0, 0.0, 32.0, 32.0], [5.0, 9.0, 37.0, 41.0]], [[8.0, 16.0, 40.0, 48.0], [3.5, 1.0, 19.0, 20.5]]],
        dtype=torch.float64,
    )
    got = roi_tokens(fmap, boxes, stride, output_size=2, sampling_ratio=2)
    for b in range(2):
        for n in range(2):
            want = _naive_roi_mean(fmap[b], boxes[b, n].tolist(), stride, 2, 2)
            assert torch.allclose(got[b, n], want, atol=1e-12)
    # On a linear map a*x + b*y (away from the border clamp) the mean is the value at the box centre.
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij")
    lin = (0.5 * xs - 2.0 * ys + 1.0)[None, None].double()
    box = torch.tensor([[[8.0, 8.0, 24.0, 40.0]]], dtype=torch.float64)  # centre (16, 24) px: cell (1.5, 2.5)
    val = roi_tokens(lin, box, stride, output_size=3, sampling_ratio=3).item()
    assert val == pytest.approx(0.5 * 1.5 - 2.0 * 2.5 + 1.0)


def test_crop_patches_exact_at_native_size() -> None:
    images = torch.randn(2, 3, 40, 48, dtype=torch.float64)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 8.0, 48.0, 40.0]], [[3.0, 5.0, 35.0, 37.0]] * 2])
    crops = crop_patches(images, boxes, 32)
    assert crops.shape == (4, 3, 32, 32)
    assert torch.allclose(crops[0], images[0, :, 0:32, 0:32], atol=1e-12)
    assert torch.allclose(crops[1], images[0, :, 8:40, 16:48], atol=1e-12)
    assert torch.allclose(crops[3], images[1, :, 5:37, 3:35], atol=1e-12)
    crops32 = crop_patches(images.float(), boxes, 32)  # float32 grid coordinates: rounding only
    assert torch.allclose(crops32[3], images[1, :, 5:37, 3:35].float(), atol=1e-5)
    up = crop_patches(images, boxes, 64)
    assert up.shape == (4, 3, 64, 64)


def test_crop_patch_tokens_pools_and_chunks() -> None:
    images = torch.randn(2, 3, 64, 64)
    boxes = sample_boxes(2, 64, DSSLConfig(num_boxes=5, box_size=16), torch.Generator().manual_seed(1))
    proj = torch.randn(3, 7)

    def encode(x: torch.Tensor) -> torch.Tensor:  # [n, 3, s, s] -> [n, 4 tokens, 7]
        t = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)
        return t @ proj

    a = crop_patch_tokens(images, boxes, encode, 32)
    b = crop_patch_tokens(images, boxes, encode, 32, chunk=3)
    assert a.shape == (2, 5, 7)
    assert torch.allclose(a, b, atol=1e-6)
    want = encode(crop_patches(images, boxes, 32)[7:8]).mean(dim=1)  # image 1, box 2
    assert torch.allclose(a[1, 2], want[0], atol=1e-6)


# ---------------------------------------------------------------- boxes and config


def test_sample_boxes_bounds_and_determinism() -> None:
    cfg = DSSLConfig(num_boxes=32, box_size=32)
    a = sample_boxes(4, (100, 70), cfg, torch.Generator().manual_seed(3))
    b = sample_boxes(4, (100, 70), cfg, torch.Generator().manual_seed(3))
    c = sample_boxes(4, (100, 70), cfg, torch.Generator().manual_seed(4))
    assert a.shape == (4, 32, 4) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[..., 0] >= 0).all() and (a[..., 1] >= 0).all()
    assert (a[..., 2] <= 70).all() and (a[..., 3] <= 100).all()
    assert torch.equal(a[..., 2] - a[..., 0], torch.full((4, 32), 32.0))
    assert torch.equal(a[..., 3] - a[..., 1], torch.full((4, 32), 32.0))
    small = sample_boxes(1, 20, cfg, torch.Generator().manual_seed(0))  # box larger than image -> whole image
    assert torch.equal(small, torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(1, 32, 4))


def test_config_capacity_and_validation() -> None:
    cfg = DSSLConfig()
    assert cfg.capacity_for(1000) == 50 and cfg.capacity_for(1001) == 51 and cfg.capacity_for(10) == 8
    with pytest.raises(ConfigError):
        DSSLConfig(patch_tokens="bogus")
    with pytest.raises(ConfigError):
        DSSLConfig.from_dict({"tau": 0.1, "nope": 1})
    assert DSSLConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- PBSD loss


def _naive_pbsd(v, tv, zm, thm, normal, valid, tau) -> list[float]:
    """Eq. 11, 16, 17 with Python loops over images, boxes and memory entries."""
    out = []
    for b in range(v.shape[0]):
        members = [m for m in range(zm.shape[1]) if valid[b, m]]
        total = 0.0
        for j in range(v.shape[1]):
            den_v = sum(math.exp(float(zm[b, m] @ v[b, j]) / tau) for m in members)
            den_t = sum(math.exp(float(thm[b, m] @ tv[b, j]) / tau) for m in members)
            for t in members:
                if not normal[b, t]:
                    continue
                p_v = math.exp(float(zm[b, t] @ v[b, j]) / tau) / den_v
                p_t = math.exp(float(thm[b, t] @ tv[b, j]) / tau) / den_t
                total += -p_v * math.log(p_t)
        out.append(total / v.shape[1])
    return out


def test_pbsd_equals_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    bsz, nb, m, dz, dt = 3, 5, 7, 4, 6
    norm = torch.nn.functional.normalize
    v = norm(torch.randn(bsz, nb, dz, generator=g, dtype=torch.float64), dim=-1)
    zm = norm(torch.randn(bsz, m, dz, generator=g, dtype=torch.float64), dim=-1)
    tv = torch.randn(bsz, nb, dt, generator=g, dtype=torch.float64)
    thm = torch.randn(bsz, m, dt, generator=g, dtype=torch.float64)
    normal = torch.rand(bsz, m, generator=g) < 0.6
    valid = torch.ones(bsz, m, dtype=torch.bool)
    valid[1, 4:] = False  # padding
    normal[0, 2] = False
    normal[2] = False  # image 2: no positive at all -> 0
    tau = 0.5
    got = pbsd_loss(v, tv, zm, thm, normal, valid, tau)
    want = _naive_pbsd(v, tv, zm, thm, normal, valid, tau)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    assert got[2].item() == 0.0 and got[0].item() > 0
    # float32 at the paper-like tau = 0.07
    got32 = pbsd_loss(v.float(), tv.float(), zm.float(), thm.float(), normal, valid, 0.07)
    want32 = _naive_pbsd(v, tv, zm, thm, normal, valid, 0.07)
    assert torch.allclose(got32.double(), torch.tensor(want32, dtype=torch.float64), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- DSSL module: gradients and memory


def _make(cfg: DSSLConfig, c: int = 8, d: int = 12, dt: int = 16) -> DSSL:
    torch.manual_seed(0)
    return DSSL(cfg, feature_dim=c, token_dim=d, text_dim=dt, class_sizes={"a": 100, "b": 40})


def _batch(bsz: int, nb: int, c: int = 8, d: int = 12, dt: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(bsz, c, 4, 4, generator=g, requires_grad=True)
    boxes = sample_boxes(bsz, 64, DSSLConfig(num_boxes=nb, box_size=32), g)
    tv = torch.randn(bsz, nb, d, generator=g, requires_grad=True)
    glob = torch.randn(bsz, d, generator=g, requires_grad=True)
    tx = torch.randn(bsz, dt, generator=g)
    return f, boxes, tv, glob, tx


def test_gradient_reaches_text_side_only() -> None:
    cfg = DSSLConfig(num_boxes=6, head_hidden=16, head_dim=8, meta_ratio=4, tau=0.2)
    model = _make(cfg).train()
    # warm the memory (no gradient tracking there: entries are stored detached)
    for s in range(3):
        f, boxes, tv, glob, tx = _batch(4, 6, seed=10 + s)
        model(f, 64, boxes, tv, glob, tx, ["a", "a", "b", "b"], [True, False, True, True])
    model.zero_grad(set_to_none=True)
    f, boxes, tv, glob, tx = _batch(4, 6, seed=1)
    out = model(f, 64, boxes, tv, glob, tx, ["a", "a", "b", "a"], [True, True, False, True])
    assert out.loss.item() > 0 and bool(out.has_positive.all())
    assert not out.v.requires_grad and not out.z.requires_grad
    out.loss.backward()
    for p in list(model.g_alpha.parameters()) + list(model.g_beta.parameters()):
        assert p.grad is None
    assert f.grad is None
    assert tv.grad is not None and tv.grad.abs().sum() > 0
    assert glob.grad is not None and glob.grad.abs().sum() > 0
    for p in model.meta_net.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    z_a, th_a, _ = model.memory.get("a")  # the pushed entries are stored detached
    assert not z_a.requires_grad and not th_a.requires_grad
    assert torch.equal(th_a[-1], out.theta[3].detach())  # the last "a" image of the batch is the newest entry


def test_without_current_batch_meta_net_gets_no_gradient() -> None:
    cfg = DSSLConfig(num_boxes=4, head_hidden=16, head_dim=8, meta_ratio=4, include_current=False)
    model = _make(cfg).train()
    f, boxes, tv, glob, tx = _batch(2, 4, seed=2)
    first = model(f, 64, boxes, tv, glob, tx, ["a", "b"], [True, True])
    assert first.loss.item() == 0.0 and not first.has_positive.any()  # empty memory: contributes 0
    f, boxes, tv, glob, tx = _batch(2, 4, seed=4)
    second = model(f, 64, boxes, tv, glob, tx, ["a", "b"], [False, True])
    # one entry per class: both distributions are 1 on it, -1 * log 1 = 0
    assert second.loss.item() == 0.0 and second.has_positive.all()
    assert len(model.memory) == 4
    model.zero_grad(set_to_none=True)
    f, boxes, tv, glob, tx = _batch(2, 4, seed=3)
    out = model(f, 64, boxes, tv, glob, tx, ["a", "b"], [False, True])
    out.loss.backward()
    assert out.loss.item() > 0 and tv.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.meta_net.parameters())


def test_eval_mode_does_not_update_memory() -> None:
    model = _make(DSSLConfig(num_boxes=4, head_hidden=16, head_dim=8)).eval()
    f, boxes, tv, glob, tx = _batch(2, 4)
    model(f, 64, boxes, tv, glob, tx, ["a", "b"], [True, True])
    assert len(model.memory) == 0
    model(f, 64, boxes, tv, glob, tx, ["a", "b"], [True, True], update_memory=True)
    assert len(model.memory) == 2


def test_roi_mode_patch_tokens() -> None:
    model = _make(DSSLConfig(num_boxes=3, patch_tokens="roi", roi_output_size=1, roi_sampling_ratio=1))
    grid = torch.arange(2 * 12 * 16.0).view(2, 12, 4, 4)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0]] * 3] * 2)  # centre (8, 8) px = cell (0, 0) at stride 16
    out = model.patch_tokens(boxes, token_grid=grid, stride=16.0)
    assert out.shape == (2, 3, 12)
    assert torch.equal(out[1, 0], grid[1, :, 0, 0])
    with pytest.raises(ValueError):
        model.patch_tokens(boxes, images=torch.zeros(2, 3, 64, 64))


def _rows(n: int, dz: int, dt: int, start: float) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.arange(start, start + n)[:, None]
    return base.expand(n, dz).clone(), -base.expand(n, dt).clone()


def test_memory_fifo_per_class_and_alignment() -> None:
    mem = DSSLMemory(2, 3, {"a": 3, "b": 2})
    z, th = _rows(4, 2, 3, 0.0)  # values 0..3
    mem.push(["a", "b", "a", "a"], [True, False, True, False], z, th)
    za, ta, na = mem.get("a")
    assert za[:, 0].tolist() == [0.0, 2.0, 3.0] and ta[:, 0].tolist() == [-0.0, -2.0, -3.0]
    assert na.tolist() == [True, True, False]
    z, th = _rows(3, 2, 3, 10.0)  # 10, 11, 12
    mem.push(["a", "b", "b"], [False, True, True], z, th)
    za, ta, na = mem.get("a")
    assert za[:, 0].tolist() == [2.0, 3.0, 10.0]  # capacity 3: oldest (0) evicted
    assert torch.equal(ta, -za[:, :1].expand(3, 3)) and na.tolist() == [True, False, False]
    zb, tb, nb = mem.get("b")
    assert zb[:, 0].tolist() == [11.0, 12.0] and nb.tolist() == [True, True]  # capacity 2
    assert torch.equal(tb, -zb[:, :1].expand(2, 3))
    mem.push(["c"], [True], *_rows(1, 2, 3, 20.0))  # unregistered class -> default capacity
    assert mem.capacities["c"] == 32 and mem.get("c")[0].shape == (1, 2)
    assert mem.get("zzz")[0].shape == (0, 2)
    z, th, normal, valid = mem.gather(["b", "zzz", "a"], torch.device("cpu"))
    assert z.shape == (3, 3, 2) and valid.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert torch.equal(th[2], ta)


def test_memory_from_class_sizes() -> None:
    cfg = DSSLConfig(min_capacity=2)
    mem = DSSLMemory.from_class_sizes({"x": 100, "y": 10}, cfg, 4, 4)
    assert mem.capacities == {"x": 5, "y": 2}


def test_memory_survives_save_and_resume(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    mem = DSSLMemory(4, 5, {"a": 3, "b": 5, "c.d/e": 2})
    names = ["a", "b", "c.d/e", "a"]
    for _ in range(3):
        normal = torch.rand(4, generator=g) < 0.5
        mem.push(names, normal, torch.randn(4, 4, generator=g), torch.randn(4, 5, generator=g))
    path = tmp_path / "mem.safetensors"
    save_file(mem.state_dict(), str(path))
    fresh = DSSLMemory(4, 5)
    fresh.load_state_dict(load_file(str(path)))
    other = DSSLMemory(4, 5)
    mem.save(str(tmp_path / "m2.safetensors"))
    other.load(str(tmp_path / "m2.safetensors"))
    for restored in (fresh, other):
        assert restored.capacities == mem.capacities and list(restored.queues) == list(mem.queues)
        for name in names:
            for a, b in zip(mem.get(name), restored.get(name), strict=True):
                assert torch.equal(a, b)
    # identical subsequent pushes
    nxt = (
        torch.tensor([True, False, True, True]),
        torch.randn(4, 4, generator=g),
        torch.randn(4, 5, generator=g),
    )
    mem.push(names, *nxt)
    fresh.push(names, *nxt)
    for name in names + ["new"]:
        for a, b in zip(mem.get(name), fresh.get(name), strict=True):
            assert torch.equal(a, b)
    for k, t in mem.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[k]), k
    with pytest.raises(ConfigError):
        DSSLMemory(3, 5).load_state_dict(mem.state_dict())


def test_dssl_resume_gives_same_loss(tmp_path) -> None:
    cfg = DSSLConfig(num_boxes=4, head_hidden=16, head_dim=8, meta_ratio=4)
    a = _make(cfg).train()
    for s in range(2):
        f, boxes, tv, glob, tx = _batch(3, 4, seed=s)
        a(f, 64, boxes, tv, glob, tx, ["a", "b", "a"], [True, True, False])
    save_file(a.memory.state_dict(), str(tmp_path / "m.safetensors"))
    b = _make(cfg).train()
    b.load_state_dict(a.state_dict())
    b.memory.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    f, boxes, tv, glob, tx = _batch(3, 4, seed=9)
    la = a(f, 64, boxes, tv, glob, tx, ["a", "b", "a"], [True, False, True]).loss
    lb = b(f, 64, boxes, tv, glob, tx, ["a", "b", "a"], [True, False, True]).loss
    assert la.item() > 0 and torch.equal(la, lb)


def test_forward_matches_naive_on_memory_plus_current_batch() -> None:
    """Candidates of image i: its class memory (oldest first) + the other same-class images of the batch."""
    cfg = DSSLConfig(num_boxes=3, head_hidden=16, head_dim=8, meta_ratio=4, tau=0.3)
    model = _make(cfg).train()
    for s in range(2):
        f, boxes, tv, glob, tx = _batch(3, 3, seed=20 + s)
        model(f, 64, boxes, tv, glob, tx, ["a", "b", "a"], [True, False, True])
    names, labels = ["a", "b", "a", "a"], [True, True, False, True]
    f, boxes, tv, glob, tx = _batch(4, 3, seed=5)
    mems = {c: model.memory.get(c) for c in ("a", "b")}
    out = model(f, 64, boxes, tv, glob, tx, names, labels, update_memory=False)
    tvn = torch.nn.functional.normalize(tv.detach(), dim=-1)
    for i, c in enumerate(names):
        zm, thm, nm = mems[c]
        others = [k for k, n in enumerate(names) if n == c and k != i]
        zc = torch.cat((zm, out.z[others]))
        thc = torch.cat((thm, out.theta.detach()[others]))
        nc = torch.cat((nm, torch.tensor([labels[k] for k in others], dtype=torch.bool)))
        want = _naive_pbsd(
            out.v[i : i + 1].double(),
            tvn[i : i + 1].double(),
            zc[None].double(),
            thc[None].double(),
            nc[None],
            torch.ones(1, len(nc), dtype=torch.bool),
            cfg.tau,
        )[0]
        assert out.per_image[i].item() == pytest.approx(want, abs=1e-5)
    assert out.loss.item() == pytest.approx(out.per_image.mean().item())

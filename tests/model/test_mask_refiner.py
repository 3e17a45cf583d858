"""OURS ``mask_decoder.refiner``: the full-resolution mask refiner, its switch and its training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vmad.errors import ConfigError, VMADError
from vmad.model.build import build_vmad
from vmad.model.mask_refiner import MaskRefiner
from vmad.model.weights_io import read_trainable
from vmad.train.refiner import (
    CHECKPOINT_NAME,
    RefinerTrainConfig,
    crop_batch,
    defect_samples,
    load_samples,
    normal_images,
    train_refiner,
)
from vmad_testing import tiny_config


def test_untrained_refiner_keeps_order_and_sign() -> None:
    torch.manual_seed(0)
    refiner = MaskRefiner(width=4, dilations=(1, 2), limit=20.0)
    images = torch.rand(2, 3, 20, 30)
    logits = torch.randn(2, 20, 30) * 30
    with torch.no_grad():
        out = refiner(images, logits)
    assert torch.allclose(out, 20.0 * torch.tanh(logits / 20.0))
    assert torch.equal(out > 0, logits > 0)  # the 0.5 mask is the decoder's own
    assert float(out.abs().max()) < 20.0
    order = torch.argsort(logits.flatten())
    assert bool((out.flatten()[order].diff() >= 0).all())
    # back on the decoder's scale: an untrained refiner gives the logits back (a threshold keeps its meaning)
    moderate = logits.clamp(-40, 40)
    assert torch.allclose(refiner.unbounded(refiner.bounded(moderate)), moderate, atol=1e-3)


def test_shrink_only_refiner_never_adds_to_the_mask() -> None:
    torch.manual_seed(0)
    free, shrink = MaskRefiner(width=4, dilations=(1, 2)), MaskRefiner(width=4, dilations=(1, 2), shrink=True)
    shrink.load_state_dict(free.state_dict())
    for m in (free, shrink):
        torch.nn.init.normal_(m.head.weight, std=2.0)  # a correction of both signs
    images, logits = torch.rand(2, 3, 20, 30), torch.randn(2, 20, 30) * 3
    with torch.no_grad():
        out_free, out_shrink = free(images, logits), shrink(images, logits)
    base = free.bounded(logits)
    assert bool((out_free > base).any())  # the free refiner raises some logits ...
    assert bool((out_shrink <= base + 1e-6).all())  # ... the shrink-only one none
    assert bool(((out_shrink > 0) <= (logits > 0)).all())  # its mask lies within the decoder's
    assert bool((out_shrink < base - 1e-3).any())
    fresh = MaskRefiner(width=4, dilations=(1, 2), shrink=True)  # zero head: the gradient still reaches it
    fresh(images, logits).sum().backward()
    assert float(fresh.head.weight.grad.abs().sum()) > 0


def test_refiner_reads_the_image_once_trained() -> None:
    torch.manual_seed(0)
    refiner = MaskRefiner(width=4, dilations=(1,))
    torch.nn.init.normal_(refiner.head.weight)
    logits = torch.zeros(1, 16, 16)
    flat, spot = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.5)
    spot[..., 8, 8] = 0.0
    with torch.no_grad():
        assert float((refiner(spot, logits) - refiner(flat, logits)).abs().max()) > 1e-3
    # images at another size are resized to the logits'
    assert refiner(torch.rand(1, 3, 32, 40), torch.zeros(1, 16, 20)).shape == (1, 16, 20)


def test_config_switch_and_masks_only(tmp_path: Path) -> None:
    from vmad.infer.detector import Detector, DetectorConfig

    cfg = tiny_config()
    plain = build_vmad(cfg).eval()
    assert plain.mask_refiner is None
    with pytest.raises(VMADError, match="no mask refiner"):
        plain.refined_mask_logits(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8))
    cfg.mask_decoder.refiner = True
    cfg.mask_decoder.refiner_width = 4
    model = build_vmad(cfg).eval()
    assert model.mask_refiner is not None
    model.load_state_dict(plain.state_dict(), strict=False)  # the same decoder
    torch.nn.init.normal_(model.mask_refiner.head.weight)
    image = torch.rand(1, 3, 64, 64)
    # the maps (and so the image scores) stay the decoder's
    decoder = plain.segment(image, "Is there a defect?").logits
    assert torch.allclose(model.segment(image, "Is there a defect?").logits, decoder)
    refined = model.refined_mask_logits(image, decoder)
    assert float((refined - decoder).abs().max()) > 1e-3
    # the detector's binary mask is the refined logits' (DetectorConfig.refine), the map is not
    [on] = Detector(model, DetectorConfig(device="cpu", threshold=0.5)).detect(image[0])
    [off] = Detector(model, DetectorConfig(device="cpu", threshold=0.5, refine=False)).detect(image[0])
    np.testing.assert_array_equal(on.probability_map, off.probability_map)
    assert on.anomaly_score == off.anomaly_score
    np.testing.assert_array_equal(off.mask, off.probability_map > 0.5)
    np.testing.assert_array_equal(on.mask, (refined[0] > 0).numpy())
    assert not np.array_equal(on.mask, off.mask)
    # another mask threshold t: the decoder's logits shifted so that t sits at the refiner's decision point
    shift = float(torch.logit(torch.tensor(0.9, dtype=torch.float64)))
    [high] = Detector(model, DetectorConfig(device="cpu", threshold=0.9)).detect(image[0])
    expected = model.refined_mask_logits(image, decoder - shift)[0] > 0
    np.testing.assert_array_equal(high.mask, expected.numpy())
    assert high.mask.sum() != on.mask.sum()


def test_saved_with_the_model(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.mask_decoder.refiner = True
    model = build_vmad(cfg)
    folder = model.save_trainable(tmp_path / "m")
    state, _ = read_trainable(folder)
    assert {k for k in state if k.startswith("mask_refiner.")} == {
        k for k in model.state_dict() if k.startswith("mask_refiner.")} != set()


@pytest.mark.parametrize("field,value", [("refiner_width", 0), ("refiner_dilations", ()),
                                         ("refiner_dilations", (1, 0)), ("refiner_limit", 0.5),
                                         ("refiner_max_side", 8)])
def test_bad_refiner_settings_refused(field: str, value: object) -> None:
    cfg = tiny_config()
    setattr(cfg.mask_decoder, field, value)
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


def _fake_coarse(image: np.ndarray, with_prior: bool) -> np.ndarray:
    """Stands in for the frozen model: a smooth map, high where the image is dark (shifted without a
    prior)."""
    grey = image.astype(np.float32).mean(-1)
    return (128.0 - grey) / 16.0 + (0.0 if with_prior else 5.0)


def _normals(root: Path, n: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"kind{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((48, 56, 3)) * 60 + 150).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"kind{i % 2}" / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_samples_paint_defects_and_shards_rebuild_the_same(tmp_path: Path) -> None:
    files = normal_images(_normals(tmp_path / "normals"))
    assert len(files) == 3 and all(f.suffix == ".png" for f in files)
    cfg = RefinerTrainConfig(samples=5, shard_size=2, max_side=40, crop=16, defect_fraction=1.0,
                             without_prior=0.5)
    asked: list[bool] = []

    def coarse(image: np.ndarray, with_prior: bool) -> np.ndarray:
        asked.append(with_prior)
        return _fake_coarse(image, with_prior)

    samples = load_samples(tmp_path / "work", files, coarse, cfg, log=lambda _: None)
    assert len(asked) == 5 and set(asked) == {True, False}  # logits with and without a prior
    assert len(samples) == 5 and len(list((tmp_path / "work").glob("samples-*.safetensors"))) == 3
    for image, logits, mask in samples:
        assert image.shape[0] == 3 and max(image.shape[1:]) <= 40
        assert logits.shape == mask.shape == (1, *image.shape[1:])
        assert mask.sum() > 0  # every sample got a defect
    (tmp_path / "work" / "samples-001.safetensors").unlink()
    again = load_samples(tmp_path / "work", files, _fake_coarse, cfg, log=lambda _: None)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
               for a, b in zip(samples, again, strict=True))
    images, logits, masks = crop_batch(samples, cfg, step=3)
    assert images.shape == (cfg.batch_size, 3, 16, 16)
    assert masks.shape == logits.shape == (cfg.batch_size, 16, 16)
    assert torch.equal(crop_batch(samples, cfg, step=3)[2], masks)
    for other in ({"shrink_only": True}, {"defects": ("/elsewhere",)}, {"seed": 1}):  # never mixed in
        with pytest.raises(VMADError, match="other settings"):
            load_samples(tmp_path / "work", files, _fake_coarse, replace(cfg, **other), log=lambda _: None)


def test_no_images_named() -> None:
    with pytest.raises(VMADError, match="no such folder"):
        normal_images("/nonexistent/normals")


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path: Path) -> None:
    files = normal_images(_normals(tmp_path / "normals"))
    cfg = RefinerTrainConfig(samples=6, shard_size=3, max_side=40, crop=16, steps=6, save_every=2,
                             batch_size=4, lr=1e-2)
    samples = load_samples(tmp_path / "work_a", files, _fake_coarse, cfg, log=lambda _: None)

    def fresh() -> MaskRefiner:
        torch.manual_seed(0)
        return MaskRefiner(width=4, dilations=(1, 2))

    straight = fresh()
    losses = train_refiner(straight, samples, cfg, tmp_path / "work_a", log=lambda _: None)
    assert len(losses) == 6 and float(straight.head.weight.detach().abs().sum()) > 0

    class Killed(Exception):
        pass

    def kill_at_4(message: str) -> None:
        if "step 4/" in message:
            raise Killed

    interrupted = fresh()
    with pytest.raises(Killed):
        train_refiner(interrupted, samples, cfg, tmp_path / "work_b", log=kill_at_4)
    assert (tmp_path / "work_b" / CHECKPOINT_NAME).is_file()
    resumed = fresh()
    messages: list[str] = []
    rest = train_refiner(resumed, samples, cfg, tmp_path / "work_b", log=messages.append)
    assert len(rest) == 2 and "resumed at step 4" in messages[0]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    other = RefinerTrainConfig(**{**cfg.__dict__, "lr": 5e-3})
    with pytest.raises(VMADError, match="other settings"):
        train_refiner(fresh(), samples, other, tmp_path / "work_b", log=lambda _: None)


def test_large_images_are_corrected_at_max_side() -> None:
    torch.manual_seed(0)
    refiner = MaskRefiner(width=4, dilations=(1,), max_side=16)
    torch.nn.init.normal_(refiner.head.weight)
    seen: list[tuple[int, ...]] = []
    refiner.inp.register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape[-2:])))
    logits = torch.randn(1, 40, 32)
    with torch.no_grad():
        out = refiner(torch.rand(1, 3, 40, 32), logits)
        small = refiner(torch.rand(1, 3, 12, 10), torch.randn(1, 12, 10))
    assert seen == [(16, 13), (12, 10)]  # reduced to 16 px on the longest side; a small image as it is
    assert out.shape == (1, 40, 32) and small.shape == (1, 12, 10)
    assert float((out - refiner.bounded(logits)).abs().max()) > 1e-3  # the correction is added back


def test_real_defects_come_in_class_groups_with_their_masks(tmp_path: Path, data_factory) -> None:
    from vmad.data.io import read_mask

    root = tmp_path / "plates"
    for i in range(4):  # MPDD layout: train/{images,masks}, a blank mask = normal
        data_factory.write_image(root / "train" / "images" / f"{i}.png", size=(40, 32), seed=i)
        box = (3 + i, 4, 20, 12) if i < 2 else None
        data_factory.write_mask(root / "train" / "masks" / f"{i}.png", size=(40, 32), box=box)
    data_factory.write_image(root / "test" / "images" / "9.png", size=(40, 32), seed=9)
    data_factory.write_mask(root / "test" / "masks" / "9.png", size=(40, 32), box=(1, 1, 5, 5))
    pool = defect_samples([root])
    assert len(pool) == 4 and {s.split for s in pool} == {"train"}  # the train split only
    cfg = RefinerTrainConfig(samples=2, shard_size=2, max_side=40, crop=16, real_samples=3, real_group=2)
    groups: list[int] = []

    def coarse_folder(images: list[np.ndarray]) -> list[np.ndarray]:
        groups.append(len(images))
        return [_fake_coarse(image, True) for image in images]

    files = normal_images(_normals(tmp_path / "normals"))
    samples = load_samples(tmp_path / "work", files, _fake_coarse, cfg, log=lambda _: None, real=pool,
                           coarse_folder=coarse_folder)
    assert groups == [2, 2]  # 3 real samples rounded up to whole groups, each detected together
    assert len(samples) == 2 + 4 and len(list((tmp_path / "work").glob("real-*.safetensors"))) == 2
    truth = {int(read_mask(s).sum()) for s in pool}
    for _, logits, mask in samples[2:]:
        assert mask.shape == logits.shape == (1, 32, 40)
        assert int(mask.sum()) in truth  # a ground-truth mask, not a painted one
    with pytest.raises(VMADError, match="needs data sets with defects"):
        load_samples(tmp_path / "other", files, _fake_coarse, cfg, log=lambda _: None)


def test_real_defects_need_annotated_defects_in_the_split(tiny_mvtec: Path, data_factory) -> None:
    with pytest.raises(VMADError, match="no anomalous image with a mask in the 'train' split"):
        defect_samples([tiny_mvtec])  # MVTec's train split holds normal images only
    assert {s.split for s in defect_samples([tiny_mvtec], split="test")} == {"test"}  # asked for by name
    widget = tiny_mvtec / "widget"  # a test split alone (like bottle here): refused, not used unasked
    only_test = tiny_mvtec.parent / "only_test" / "widget"
    (only_test / "test").parent.mkdir(parents=True)
    (widget / "test").rename(only_test / "test")
    (widget / "ground_truth").rename(only_test / "ground_truth")
    with pytest.raises(VMADError, match="no 'train' split"):
        defect_samples([only_test.parent])

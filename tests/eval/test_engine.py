"""The evaluation engine and `vmad eval` on a synthetic MVTec-layout dataset with a scorer whose answers are
perfect by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.cli import main
from vmad.data import load_dataset
from vmad.errors import VMADError
from vmad.eval.engine import EvalSettings, evaluate, nan_mean, postprocess_map, resize_map, subsample
from vmad.eval.scorer import ScoreOutput
from vmad.eval.tables import results_markdown, table_i_markdown

KEYS = {
    "image_auroc",
    "image_ap",
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "aupro_200",
    "f1_max_image",
    "f1_max_pixel",
    "n_normal",
    "n_anomalous",
}


class MedianDiffScorer:
    """Anomaly map = per-pixel absolute difference from the class's median image (grey); image score = max.
    ``factor`` > 1 returns maps downsampled by that factor (block mean), to exercise the resizing."""

    name = "median-diff"

    def __init__(self, factor: int = 1) -> None:
        self.factor = factor
        self.calls: list[tuple[str, int]] = []

    def settings(self) -> dict:
        return {"factor": self.factor}

    def score(self, images, class_name):
        self.calls.append((class_name, len(images)))
        grey = np.stack([im.astype(np.float32).mean(axis=2) for im in images])
        maps = np.abs(grey - np.median(grey, axis=0))
        if self.factor > 1:
            n, h, w = maps.shape
            f = self.factor
            maps = maps[:, : h - h % f, : w - w % f].reshape(n, h // f, f, w // f, f).mean(axis=(2, 4))
        return ScoreOutput(image_scores=maps.reshape(len(images), -1).max(axis=1), anomaly_maps=maps)


def _write_class(root: Path, name: str, size: tuple[int, int], n_good: int, n_bad: int, seed: int) -> None:
    """Normal images = a smooth pattern + noise in [-3, 3]; anomalous ones add +120 in a square whose place
    differs from image to image (so the per-pixel median stays the pattern)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 30 * np.sin(yy / 5.0) + 20 * np.cos(xx / 7.0)

    def save(arr: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)

    for i in range(n_good):
        img = base + rng.integers(-3, 4, (h, w))
        save(np.repeat(img[:, :, None], 3, axis=2), root / name / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        img = base + rng.integers(-3, 4, (h, w))
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = 2 + (i * 7) % (h - 10), 2 + (i * 11) % (w - 10)
        mask[y0 : y0 + 5, x0 : x0 + 4 + i % 3] = 255
        img = img + 120 * (mask > 0)
        save(np.repeat(img[:, :, None], 3, axis=2), root / name / "test" / "spot" / f"{i:03d}.png")
        save(mask, root / name / "ground_truth" / "spot" / f"{i:03d}_mask.png")


@pytest.fixture
def easy_root(tmp_path: Path) -> Path:
    root = tmp_path / "easy"
    _write_class(root, "plate", (40, 48), n_good=4, n_bad=4, seed=0)
    _write_class(root, "disc", (36, 36), n_good=3, n_bad=3, seed=1)
    _write_class(root, "rod", (30, 40), n_good=0, n_bad=3, seed=2)  # no normal image: image metrics NaN
    return root


def test_perfect_scorer_gives_perfect_metrics(easy_root, tmp_path):
    scorer = MedianDiffScorer()
    out = tmp_path / "out"
    result = evaluate(scorer, [load_dataset(easy_root)], out_dir=out, smoothing_sigma=0, progress=False)
    assert sorted(c for c, _ in scorer.calls) == ["disc", "plate", "rod"]
    res = json.loads((out / "results.json").read_text())
    assert res == result.results
    assert set(res) >= {"classes", "mean", "timing", "scorer", "settings"}
    assert set(res["classes"]) == {"plate", "disc", "rod"}
    for name, n_good, n_bad in (("plate", 4, 4), ("disc", 3, 3)):
        row = res["classes"][name]
        assert KEYS <= set(row)
        assert (row["n_normal"], row["n_anomalous"]) == (n_good, n_bad)
        for k in KEYS - {"n_normal", "n_anomalous"}:
            assert row[k] == pytest.approx(1.0), (name, k)
    rod = res["classes"]["rod"]
    assert rod["image_auroc"] is None and rod["image_ap"] is None and rod["f1_max_image"] is None
    assert rod["pixel_auroc"] == pytest.approx(1.0) and rod["aupro"] == pytest.approx(1.0)
    assert any("only anomalous" in msg for msg in res["notes"]["rod"])
    assert res["mean"]["image_auroc"] == pytest.approx(1.0)
    assert res["mean"]["n_classes"]["image_auroc"] == 2 and res["mean"]["n_classes"]["aupro"] == 3
    assert res["scorer"] == {"name": "median-diff", "settings": {"factor": 1}}
    assert res["settings"]["smoothing_sigma"] == 0 and res["settings"]["split"] == "test"
    t = res["timing"]
    assert t["n_images"] == 17 and 0 < t["model_s_per_image"] <= t["end_to_end_s_per_image"]
    md = (out / "results.md").read_text()
    assert md == result.markdown
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| Class | Img AUROC | Img AP | Pixel AUROC | AUPRO |")
    assert any(ln.startswith("| plate | 100.0 | 100.0 | 100.0 | 100.0 |") for ln in lines)
    assert any(ln.startswith("| rod | – | – | 100.0 | 100.0 |") for ln in lines)
    assert lines[-1].startswith("| **mean** | 100.0 | 100.0 | 100.0 | 100.0 |")
    csv = (out / "image_scores.csv").read_text().splitlines()
    assert csv[0] == "class,image,label,score" and len(csv) == 18


def test_wrong_scorer_is_caught_and_resizing_smoothing_run(easy_root):
    ds = load_dataset(easy_root)
    scorer = MedianDiffScorer(factor=4)
    res = evaluate(scorer, [ds], smoothing_sigma=4.0, progress=False).results
    for row in res["classes"].values():  # coarse, blurred maps: still far above chance
        assert all(0.0 <= row[k] <= 1.0 for k in ("pixel_auroc", "pixel_ap", "aupro", "aupro_200"))
        assert row["pixel_auroc"] > 0.9 and row["aupro"] > 0.6
    assert res["settings"]["smoothing"].startswith("gaussian_filter(sigma=4.0")

    class Broken(MedianDiffScorer):
        def score(self, images, class_name):
            out = super().score(images, class_name)
            return ScoreOutput(out.image_scores[:-1], out.anomaly_maps)

    with pytest.raises(VMADError, match="on class .disc.: expected 6 image scores and 6 maps, got 5"):
        evaluate(Broken(), [ds], progress=False)


def test_split_selection_and_several_datasets(easy_root, tmp_path):
    other = tmp_path / "other"
    _write_class(other, "plate", (32, 32), n_good=3, n_bad=2, seed=5)
    res = evaluate(
        MedianDiffScorer(),
        [load_dataset(easy_root), load_dataset(other)],
        smoothing_sigma=0,
        max_per_class=5,
        progress=False,
    ).results
    assert set(res["classes"]) == {"easy/plate", "disc", "rod", "other/plate"}  # "plate" is in both
    assert res["classes"]["easy/plate"]["n_normal"] + res["classes"]["easy/plate"]["n_anomalous"] == 5
    assert res["datasets"]["other"]["classes"] == ["other/plate"]
    md = results_markdown(res)
    assert "| *mean easy* |" in md and "| *mean other* |" not in md  # one class: no mean row
    with pytest.raises(VMADError, match="no sample to evaluate in split 'train'"):
        evaluate(MedianDiffScorer(), [load_dataset(other)], split="train", progress=False)
    table = table_i_markdown({"median-diff": res})
    head = "| Method | easy Img | easy Pixel | easy PRO | easy AP | other Img"
    assert table.splitlines()[0].startswith(head)
    assert table.splitlines()[2].startswith("| median-diff | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |")


def test_resize_is_bilinear_half_pixel_like_pil():
    rng = np.random.default_rng(0)
    small = rng.random((5, 7)).astype(np.float32)
    ours = resize_map(small, (20, 21))
    pil = np.asarray(Image.fromarray(small, mode="F").resize((21, 20), Image.Resampling.BILINEAR))
    assert ours.shape == (20, 21) and ours.dtype == np.float32
    assert np.allclose(ours, pil, atol=1e-5)
    flat = postprocess_map(np.full((4, 4), 0.3), (16, 12), EvalSettings(smoothing_sigma=4))
    assert flat.shape == (16, 12) and np.allclose(flat, 0.3)


def test_helpers():
    assert subsample(list(range(10)), 4) == [0, 3, 6, 9] and subsample([1, 2], 5) == [1, 2]
    mean = nan_mean([{"a": 0.5}, {"a": math.nan}, {"a": 1.0}], ["a"])
    assert mean == {"a": 0.75, "n_classes": {"a": 2}}
    with pytest.raises(VMADError, match="sigma"):
        EvalSettings(smoothing_sigma=-1).validate()


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_bad_data_path(tmp_path, capsys):
    missing = tmp_path / "missing"
    code = main(["eval", "--baseline", "musc", "--data", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"error: {missing}: no such file or folder"]
    assert not (tmp_path / "o").exists()


def test_cli_runs_a_registered_baseline(easy_root, tmp_path, capsys, monkeypatch):
    import vmad.baselines

    seen = {}

    def fake_build(name, **options):
        seen.update(name=name, options=options)
        return MedianDiffScorer()

    monkeypatch.setattr(vmad.baselines, "build_baseline", fake_build)
    out = tmp_path / "cli_out"
    code = main(
        [
            "eval",
            "--baseline",
            "median",
            "--baseline-opt",
            "k=3",
            "--data",
            str(easy_root),
            "--out",
            str(out),
            "--sigma",
            "0",
            "--no-progress",
            "--json",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and seen == {"name": "median", "options": {"k": "3"}}
    assert json.loads(printed) == json.loads((out / "results.json").read_text())
    assert json.loads(printed)["mean"]["aupro"] == pytest.approx(1.0)
    code = main(["eval", "--baseline", "median", "--baseline-opt", "novalue", "--data", str(easy_root)])
    assert code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


def test_cli_model_that_does_not_exist(easy_root, tmp_path, capsys):
    code = main(["eval", "--model", "some.ckpt", "--data", str(easy_root), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "some.ckpt: no such model folder" in err


def test_results_store_image_and_pixel_thresholds(easy_root, tmp_path):
    out = tmp_path / "out"
    result = evaluate(MedianDiffScorer(), [load_dataset(easy_root)], out_dir=out, smoothing_sigma=0,
                      progress=False)
    res = json.loads((out / "results.json").read_text())
    plate = res["classes"]["plate"]["thresholds"]
    assert plate["fpr"] == 0.05 and "> threshold" in plate["rule"]
    scores = [float(r.split(",")[3]) for r in (out / "image_scores.csv").read_text().splitlines()[1:]
              if r.startswith("plate,")]
    labels = [int(r.split(",")[2]) for r in (out / "image_scores.csv").read_text().splitlines()[1:]
              if r.startswith("plate,")]
    # the perfect scorer: the F1-max threshold separates the two classes exactly
    t = plate["image"]["f1_max"]
    assert all((s > t) == bool(y) for s, y in zip(scores, labels, strict=True))
    assert plate["image"]["at_fpr"] == max(s for s, y in zip(scores, labels, strict=True) if y == 0)
    assert plate["pixel"]["f1_max"] is not None and plate["pixel"]["at_fpr"] is not None
    assert res["classes"]["rod"]["thresholds"]["image"] == {"f1_max": None, "at_fpr": None}
    assert "thresholds" in res["settings"] and "plate: image F1-max" in result.markdown


# ---------------------------------------------------------------------------------------------- batching


class ChunkedMaxScorer:
    """Scores images independently (anomaly map = grey level, image score = its max) and asks for
    ``images_per_call`` images per call."""

    name = "chunked-max"

    def __init__(self, images_per_call: int | None) -> None:
        self.images_per_call = images_per_call
        self.calls: list[int] = []

    def settings(self) -> dict:
        return {}

    def score(self, images, class_name):
        self.calls.append(len(images))
        maps = [im.astype(np.float32).mean(axis=2) for im in images]
        return ScoreOutput(image_scores=np.array([m.max() for m in maps]), anomaly_maps=maps)


def _metrics(result) -> dict:
    return {k: {m: row[m] for m in KEYS} for k, row in result.results["classes"].items()}


@pytest.mark.parametrize("workers", [0, 1])
def test_chunked_scorer_gets_its_batch_size_and_gives_the_same_results(easy_root, workers):
    """A scorer with images_per_call is handed that many images per call (the decoding worker reading ahead
    or not); the results equal those of the whole class in one call, image order kept."""
    dataset = load_dataset(easy_root)
    whole = evaluate(ChunkedMaxScorer(None), [dataset], smoothing_sigma=0, progress=False)
    scorer = ChunkedMaxScorer(3)
    chunked = evaluate(scorer, [dataset], smoothing_sigma=0, progress=False,
                       settings=EvalSettings(smoothing_sigma=0, workers=workers))
    assert sorted(scorer.calls) == sorted([3, 3, 2, 3, 3, 3])  # plate 8, disc 6, rod 3 images
    assert _metrics(chunked) == _metrics(whole)
    assert chunked.results["settings"]["workers"] == workers
    with pytest.raises(VMADError, match="workers"):
        EvalSettings(workers=-1).validate()


def test_unreadable_image_is_one_error_line_with_workers(easy_root, tmp_path, capsys):
    broken = easy_root / "plate" / "test" / "good" / "001.png"
    broken.write_bytes(b"not a png")
    code = main(["eval", "--baseline", "musc", "--data", str(easy_root), "--out", str(tmp_path / "o"),
                 "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {broken}")


def test_cli_model_batch_size_and_workers_do_not_change_results(tiny_ckpt, tmp_path, capsys):
    root = tmp_path / "data"
    _write_class(root, "plate", (40, 48), n_good=3, n_bad=3, seed=0)
    results = []
    for extra in (["--batch-size", "1", "--workers", "0"], ["--batch-size", "4", "--workers", "1"]):
        out = tmp_path / f"out{extra[1]}"
        code = main(["eval", "--model", str(tiny_ckpt), "--data", str(root), "--out", str(out),
                     "--sigma", "0", "--no-progress", "--device", "cpu", *extra])
        assert code == 0, capsys.readouterr().err
        results.append(json.loads((out / "results.json").read_text()))
    one, four = results
    assert one["scorer"]["settings"]["batch_size"] == 1 and four["scorer"]["settings"]["batch_size"] == 4
    for key in KEYS:
        assert one["classes"]["plate"][key] == pytest.approx(four["classes"]["plate"][key], abs=1e-6)
    code = main(["eval", "--baseline", "musc", "--data", str(root), "--batch-size", "2"])
    assert code == 2
    assert "--batch-size, --device, --prior, --group-size and --no-refine apply to --model" in (
        capsys.readouterr().err)
    code = main(["eval", "--model", str(tiny_ckpt), "--data", str(root), "--prior", "self", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--prior:" in err and "takes no normality prior" in err
    code = main(["eval", "--model", str(tiny_ckpt), "--data", str(root), "--no-refine", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--no-refine:" in err and "has no mask refiner" in err

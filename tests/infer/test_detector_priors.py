"""Normality priors (OURS) through the Detector and the evaluation scorer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vmad.errors import ConfigError
from vmad.infer.detector import Detector, DetectorConfig, VMADScorer
from vmad.model.build import build_vmad
from vmad.model.prior_prompt import SKIP_GAIN
from vmad_testing import tiny_config


@pytest.fixture(scope="module")
def prior_detector() -> Detector:
    cfg = tiny_config()
    cfg.mask_decoder.prior_prompt = True
    torch.manual_seed(0)
    model = build_vmad(cfg)
    with torch.no_grad():
        model.mask_decoder.prior_prompt.skip_weight.fill_(1.0 / SKIP_GAIN)  # as if trained: w = 1
    return Detector(model, DetectorConfig(device="cpu", batch_size=2))


def parts(n: int, stain: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.clip(rng.normal(128, 4, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(n)]
    out[stain][8:24, 36:52] = (240, 30, 30)
    return out


def write_parts(folder, n: int, stain: int, prefix: str = "") -> None:  # noqa: ANN001
    """:func:`parts` as PNG files ``<prefix><i>.png`` in a new ``folder``."""
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(parts(n, stain)):
        Image.fromarray(image).save(folder / f"{prefix}{i}.png")


def count_priors(monkeypatch, detector: Detector) -> list[int]:  # noqa: ANN001
    """The number of images of each :meth:`Detector.normality_priors` call, appended as they happen."""
    seen: list[int] = []
    real = detector.normality_priors
    monkeypatch.setattr(detector, "normality_priors",
                        lambda ims, refs=(): seen.append(len(ims)) or real(ims, refs))
    return seen


def test_folder_priors_reach_the_masks(prior_detector: Detector) -> None:
    images = parts(4, stain=1)
    with_prior = prior_detector.detect(images)
    assert [d.prior for d in with_prior] == ["folder"] * 4
    assert all(d.summary()["prior"] == "folder" for d in with_prior)
    off = Detector(prior_detector.model, DetectorConfig(device="cpu", batch_size=2, prior="off"))
    plain = off.detect(images)
    assert all(d.prior is None for d in plain)
    lift = with_prior[1].probability_map - plain[1].probability_map
    assert lift[8:24, 36:52].mean() > 0.2 and abs(lift[48:, :16]).max() < lift[8:24, 36:52].mean()


def test_single_image_goes_without_and_references_give_one(prior_detector: Detector) -> None:
    images = parts(4, stain=0)
    [alone] = prior_detector.detect(images[0])
    assert alone.prior == "none"
    priors = prior_detector.normality_priors([images[0]], references=images[1:])
    [with_refs] = prior_detector.detect(images[0], priors=priors)
    assert with_refs.prior == "references"
    stain = (slice(8, 24), slice(36, 52))
    assert float(with_refs.probability_map[stain].mean()) > float(alone.probability_map[stain].mean())


def test_self_priors_for_images_with_nothing_to_compare_with(prior_detector: Detector) -> None:
    images = parts(4, stain=0)
    plain = Detector(prior_detector.model, DetectorConfig(device="cpu", prior="off")).detect(images[0])[0]
    own = Detector(prior_detector.model, DetectorConfig(device="cpu", prior="folder+self"))
    [alone] = own.detect(images[0])
    assert alone.prior == "self"
    stain = (slice(8, 24), slice(36, 52))
    assert float(alone.probability_map[stain].mean()) > float(plain.probability_map[stain].mean()) + 0.1
    assert [d.prior for d in own.detect(images)] == ["folder"] * 4  # a folder of one kind: mutual scoring
    each = Detector(prior_detector.model, DetectorConfig(device="cpu", prior="self")).detect(images)
    assert [d.prior for d in each] == ["self"] * 4  # every image on its own
    np.testing.assert_allclose(each[0].probability_map, alone.probability_map, atol=1e-5)


def test_scorer_takes_a_whole_class_when_the_model_uses_priors(prior_detector: Detector) -> None:
    scorer = VMADScorer(detector=prior_detector, config=prior_detector.config)
    assert scorer.images_per_call is None  # mutual scoring needs every image of the class
    out = scorer.score(parts(3, stain=2), "part")
    assert int(np.argmax(out.image_scores)) == 2
    off = VMADScorer(detector=prior_detector, config=DetectorConfig(device="cpu", batch_size=2, prior="off"))
    assert off.images_per_call == 2


def test_scorer_scores_a_large_class_in_interleaved_groups(prior_detector, monkeypatch) -> None:
    from vmad.baselines.musc import interleaved_groups

    assert interleaved_groups(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert interleaved_groups(7, 0) == interleaved_groups(7, 7) == [list(range(7))]
    images = parts(7, stain=4)
    seen = count_priors(monkeypatch, prior_detector)
    whole = VMADScorer(detector=prior_detector, config=prior_detector.config).score(images, "part")
    config = replace(prior_detector.config, prior_group_size=3)
    grouped = VMADScorer(detector=prior_detector, config=config).score(images, "part")
    assert seen == [7, 3, 2, 2]  # the whole class, then one mutual scoring per group
    assert int(np.argmax(grouped.image_scores)) == 4  # in input order
    # image 4 (group [1, 4]) has its own map back in its place; the others differ from the whole-class run
    assert not np.allclose(grouped.anomaly_maps[4], grouped.anomaly_maps[1])
    assert not np.allclose(whole.image_scores, grouped.image_scores)
    settings = VMADScorer(detector=prior_detector, config=config).settings()
    assert (settings["prior"], settings["prior_group_size"]) == ("folder", 3)  # the results say how
    with pytest.raises(ConfigError, match="prior_group_size"):
        replace(config, prior_group_size=1).validate()


def test_detect_cli_scores_priors_over_the_whole_folder(prior_detector, tmp_path, monkeypatch) -> None:
    import json

    from vmad.cli import main
    from vmad.infer import detector as detector_module

    folder = tmp_path / "in"
    write_parts(folder, 5, stain=3)
    monkeypatch.setattr(detector_module.Detector, "from_pretrained",
                        classmethod(lambda cls, *a, **k: prior_detector))
    seen = count_priors(monkeypatch, prior_detector)
    assert main(["detect", str(folder), "--out", str(tmp_path / "out"), "--no-answer", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert seen == [5]  # one mutual scoring over the folder, not one per batch of 2
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["images"]
    assert [r["prior"] for r in rows] == ["folder"] * 5
    assert max(rows, key=lambda r: r["score"])["file"].endswith("3.png")


def test_detect_cli_scores_a_large_folder_in_interleaved_groups(prior_detector, tmp_path, monkeypatch,
                                                              capsys) -> None:
    import json

    from vmad.cli import main
    from vmad.infer import detector as detector_module

    folder = tmp_path / "in"
    write_parts(folder, 7, stain=4)
    monkeypatch.setattr(detector_module.Detector, "from_pretrained",
                        classmethod(lambda cls, *a, **k: prior_detector))
    seen, done = count_priors(monkeypatch, prior_detector), []
    real_detect = prior_detector.detect
    def detect(images, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        done.append((len(seen), len(images)))
        return real_detect(images, *args, **kwargs)

    monkeypatch.setattr(prior_detector, "detect", detect)
    out = tmp_path / "out"
    assert main(["detect", str(folder), "--out", str(out), "--no-answer", "--group-size", "3",
                 "--no-progress"]) == 0
    assert seen == [3, 2, 2]  # one mutual scoring per group
    assert [g for g, _ in done] == [1, 2, 3]  # each group detected before the next group is scored
    assert "3 interleaved groups of at most 3" in capsys.readouterr().err
    rows = json.loads((out / "summary.json").read_text())["images"]
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == [f"{i}.png" for i in range(7)]
    assert [r["prior"] for r in rows] == ["folder"] * 7
    assert max(rows, key=lambda r: r["score"])["file"].endswith("4.png")
    assert main(["detect", str(folder), "--out", str(out), "--group-size", "1"]) == 2  # a usage error
    assert "--group-size must be 0 (the whole folder) or at least 2" in capsys.readouterr().err


def test_add_prior_command_gives_trained_weights_the_prior(tiny_ckpt, tmp_path, capsys) -> None:
    from vmad.cli import main

    out = tmp_path / "with_prior"
    args = ["model", "add-prior", "--model", str(tiny_ckpt), "--skip-weight", "2", "--skip-offset", "0",
            "--out", str(out)]
    assert main(args) == 0
    base = Detector.from_pretrained(tiny_ckpt, config=DetectorConfig(device="cpu"))
    fused = Detector.from_pretrained(out, config=DetectorConfig(device="cpu"))
    prompt = fused.model.mask_decoder.prior_prompt
    assert float(prompt.skip_weight) * SKIP_GAIN == pytest.approx(2.0)
    assert fused.model.config.mask_decoder.prior_skip_init == 2.0
    images = parts(4, stain=1)
    # one image: no prior, exactly the input model
    [a], [b] = base.detect(images[1]), fused.detect(images[1])
    assert b.prior == "none"
    np.testing.assert_array_equal(a.probability_map, b.probability_map)
    # a folder: the prior raises the stain's probabilities, the weights' own decoder is unchanged
    plain, with_prior = base.detect(images), fused.detect(images)
    stain = (slice(8, 24), slice(36, 52))
    assert with_prior[1].probability_map[stain].mean() > plain[1].probability_map[stain].mean() + 0.05
    # a model that already takes one (as the packaged small): the prior prompt kept, the settings replaced
    again = ["model", "add-prior", "--model", str(out), "--skip-weight", "1", "--skip-offset", "0.5",
             "--out", str(tmp_path / "y")]
    assert main(again) == 0
    assert "already takes a normality prior (skip weight 2.0, skip offset 0.0" in capsys.readouterr().out
    replaced = Detector.from_pretrained(tmp_path / "y", config=DetectorConfig(device="cpu")).model
    assert float(replaced.mask_decoder.prior_prompt.skip_weight) * SKIP_GAIN == pytest.approx(1.0)
    assert replaced.config.mask_decoder.prior_skip_offset == 0.5
    # defaults: the weights chosen on held-out surfaces
    assert main(["model", "add-prior", "--model", str(tiny_ckpt), "--out", str(tmp_path / "d")]) == 0
    defaults = Detector.from_pretrained(tmp_path / "d", config=DetectorConfig(device="cpu")).model.config
    assert (defaults.mask_decoder.prior_skip_init, defaults.score.prior_weight, defaults.score.space) == (
        8.0, 0.0, "logit")
    assert defaults.mask_decoder.prior_skip_offset == 2.0
    assert main(["model", "add-prior", "--model", str(tiny_ckpt), "--score-space", "probability",
                 "--out", str(tmp_path / "p")]) == 0
    prob = Detector.from_pretrained(tmp_path / "p", config=DetectorConfig(device="cpu")).model.config
    assert prob.score.space == "probability"
    (tmp_path / "file").write_text("x")
    onto_file = ["model", "add-prior", "--model", str(tiny_ckpt), "--skip-weight", "1",
                 "--out", str(tmp_path / "file" / "m")]
    assert main(onto_file) != 0
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def logit_detector(prior_detector: Detector) -> Detector:
    """A copy of the prior model scoring in log-odds, with a skip strong enough to saturate probabilities."""
    import copy

    model = copy.deepcopy(prior_detector.model)
    model.config.score.space = "logit"
    with torch.no_grad():
        model.mask_decoder.prior_prompt.skip_weight.fill_(40.0 / SKIP_GAIN)
    return Detector(model, DetectorConfig(device="cpu", batch_size=2))


def test_logit_score_space_gives_the_evaluation_log_odds(prior_detector: Detector) -> None:
    det = logit_detector(prior_detector)
    images = parts(4, stain=2)
    dets = det.detect(images)
    d = dets[2]
    assert d.logit_map is not None and d.logit_map.shape == d.probability_map.shape
    expit = 1 / (1 + np.exp(-d.logit_map.astype(np.float64)))
    np.testing.assert_allclose(d.probability_map, expit, atol=1e-6)
    assert float(d.probability_map.max()) == 1.0 and float(d.logit_map.max()) > 17.0  # saturated, not tied
    assert d.score_logit is not None and d.anomaly_score == pytest.approx(1 / (1 + np.exp(-d.score_logit)))
    out = VMADScorer(detector=det, config=det.config).score(images, "part")
    np.testing.assert_allclose(out.anomaly_maps[2], d.logit_map, atol=1e-2)  # another batch: float noise
    assert out.image_scores.tolist() == pytest.approx([x.score_logit for x in dets], abs=1e-2)
    assert int(np.argmax(out.image_scores)) == 2
    # probability space (the default): probabilities, no logit map
    plain = prior_detector.detect(images)
    assert plain[2].logit_map is None and plain[2].score_logit is None


def test_detect_cli_reports_the_log_odds(prior_detector, tmp_path, monkeypatch, capsys) -> None:
    import json

    from vmad.cli import main
    from vmad.infer import detector as detector_module

    det = logit_detector(prior_detector)
    folder = tmp_path / "in"
    write_parts(folder, 3, stain=1)
    monkeypatch.setattr(detector_module.Detector, "from_pretrained", classmethod(lambda cls, *a, **k: det))
    assert main(["detect", str(folder), "--out", str(tmp_path / "out"), "--no-answer", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["images"]
    z = [r["score_logit"] for r in rows]
    assert all(isinstance(v, float) for v in z) and max(range(3), key=z.__getitem__) == 1
    expit = [1 / (1 + np.exp(-v)) for v in z]
    assert [r["score"] for r in rows] == pytest.approx(expit, abs=1e-6)
    assert "(log-odds " in capsys.readouterr().out


def test_detect_cli_gives_an_image_unlike_the_folder_no_prior(prior_detector, tmp_path, monkeypatch,
                                                               capsys) -> None:
    import json

    from PIL import Image

    from vmad.cli import main
    from vmad.infer import detector as detector_module

    folder = tmp_path / "in"
    write_parts(folder, 4, stain=2, prefix="part")
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = (0, 255, 0)
    stripes[::8] = (255, 0, 255)  # another object altogether
    Image.fromarray(stripes).save(folder / "zother.png")
    monkeypatch.setattr(detector_module.Detector, "from_pretrained",  # the CLI's settings, the test's model
                        classmethod(lambda cls, *a, config, **k: Detector(prior_detector.model, config)))
    assert main(["detect", str(folder), "--out", str(tmp_path / "out"), "--no-answer", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["images"]
    assert [r["prior"] for r in rows] == ["folder"] * 4 + ["none"]
    err = capsys.readouterr().err
    assert "1 of 5 image(s) unlike every other image" in err
    assert "normality prior: scoring 5 image(s) against each other first" in err
    assert main(["detect", str(folder), "--out", str(tmp_path / "own"), "--no-answer", "--no-progress",
                 "--prior", "folder+self"]) == 0
    rows = json.loads((tmp_path / "own" / "summary.json").read_text())["images"]
    assert [r["prior"] for r in rows] == ["folder"] * 4 + ["self"]
    assert "get a prior from their own patches only" in capsys.readouterr().err


def test_prior_option_is_refused_where_no_prior_is_taken(tiny_ckpt, tmp_path, capsys) -> None:
    from PIL import Image

    from vmad.cli import main

    Image.fromarray(parts(1, stain=0)[0]).save(tmp_path / "a.png")
    for who in (["--model", str(tiny_ckpt)], ["--baseline", "musc"]):
        assert main(["detect", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--no-answer",
                     "--prior", "self", *who]) != 0
        err = capsys.readouterr().err
        assert "--prior:" in err and "takes no normality prior" in err


def test_skip_offset_shifts_every_logit_of_an_image_with_a_prior_alike(tiny_ckpt, tmp_path) -> None:
    from vmad.cli import main

    for name, offset in (("k0", "0"), ("k3", "3")):
        assert main(["model", "add-prior", "--model", str(tiny_ckpt), "--skip-weight", "2", "--skip-offset",
                     offset, "--out", str(tmp_path / name)]) == 0
    k0, k3 = (Detector.from_pretrained(tmp_path / n, config=DetectorConfig(device="cpu"))
              for n in ("k0", "k3"))
    assert k3.model.config.mask_decoder.prior_skip_offset == 3.0
    images = parts(4, stain=1)
    a, b = k0.detect(images), k3.detect(images)
    for x, y in zip(a, b, strict=True):
        assert x.prior == y.prior == "folder"
        np.testing.assert_allclose(y.logit_map, x.logit_map - 2 * 3, atol=1e-3)  # w x k everywhere
        assert y.score_logit == pytest.approx(x.score_logit - 6, abs=1e-3)
        assert y.mask.sum() <= x.mask.sum()
    [lone_a], [lone_b] = k0.detect(images[1]), k3.detect(images[1])  # no prior: no shift
    np.testing.assert_array_equal(lone_a.logit_map, lone_b.logit_map)


def test_calibration_gives_images_without_a_prior_their_own_thresholds(prior_detector, tmp_path) -> None:
    from vmad.errors import VMADError
    from vmad.infer.calibration import Calibration

    rng = np.random.default_rng(3)
    normal = [np.clip(rng.normal(128, 4, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(5)]
    detector = Detector(prior_detector.model, DetectorConfig(device="cpu", batch_size=2))
    cal = detector.calibrate(normal)
    alone = cal.without_prior
    assert alone is not None and len(alone["scores"]) == 5
    assert alone["image_threshold"] != pytest.approx(cal.image_threshold)  # two scales
    assert detector.config.image_threshold_without_prior == pytest.approx(alone["image_threshold"])
    images = parts(4, stain=1)
    in_folder = detector.detect(images)
    [single] = detector.detect(images[1])
    assert all(d.prior == "folder" and d.image_threshold == cal.image_threshold for d in in_folder)
    assert single.prior == "none" and single.image_threshold == pytest.approx(alone["image_threshold"])
    assert single.verdict == ("anomalous" if single.anomaly_score > alone["image_threshold"] else "normal")
    again = Calibration.load(cal.save(tmp_path / "t.json"))
    assert again.without_prior["image_threshold"] == alone["image_threshold"]
    assert again.without_prior["scores"] == alone["scores"]
    data = again.to_dict()
    data["without_prior"] = {**alone, "image_threshold": "high"}
    with pytest.raises(VMADError, match="without_prior.image_threshold must be a finite number"):
        Calibration.from_dict(data, "t.json")
    off = Detector(prior_detector.model, DetectorConfig(device="cpu", prior="off"))
    assert off.calibrate(normal).without_prior is None  # a detector that gives no prior: one scale


def test_prior_option_offers_the_detector_settings() -> None:
    import argparse

    from vmad.cli.options import add_prior_opt
    from vmad.infer.detector import PRIOR_USES

    parser = argparse.ArgumentParser()
    add_prior_opt(parser)
    [action] = [a for a in parser._actions if a.dest == "prior"]
    assert tuple(action.choices) == PRIOR_USES  # one list: DetectorConfig.prior's Literal

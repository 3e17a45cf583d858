"""The OURS normality-prior prompt of the mask decoder (vmad.model.prior_prompt)."""

from __future__ import annotations

import torch

from vmad.model.build import build_vmad
from vmad.model.prior_prompt import SKIP_GAIN, prior_to_frame
from vmad_testing import tiny_config


def prior_model(skip: bool = True):
    cfg = tiny_config()
    cfg.mask_decoder.prior_prompt = True
    cfg.mask_decoder.prior_skip = skip
    torch.manual_seed(0)
    return build_vmad(cfg).eval()


def spot_prior(n: int, size: int = 32) -> torch.Tensor:
    prior = torch.zeros(n, 1, size, size)
    prior[:, :, 4:12, 20:28] = 8.0
    return prior


def test_zero_initialised_prompt_changes_nothing_until_trained() -> None:
    model = prior_model()
    images = torch.rand(2, 3, 64, 64)
    plain = model.segment(images, "Segment the defect.")
    with_prior = model.segment(images, "Segment the defect.", priors=spot_prior(2))
    assert torch.equal(plain.probs, with_prior.probs)


def test_trained_prompt_moves_masks_where_the_prior_is_high() -> None:
    model = prior_model()
    with torch.no_grad():
        model.mask_decoder.prior_prompt.skip_weight.fill_(1.0 / SKIP_GAIN)  # w = 1
    images = torch.rand(2, 3, 64, 64)
    prior = spot_prior(2)
    prior[1] = float("nan")  # the second image has no prior
    plain = model.segment(images, "Segment the defect.").logits
    out = model.segment(images, "Segment the defect.", priors=prior).logits
    delta = out - plain
    assert float(delta[0, 8:24, 40:56].mean()) > 3.0  # the spot (8 units, scaled to 64 px) is pushed up
    assert float(delta[0, 40:, :30].abs().max()) < 1e-4  # far from it: nothing
    assert torch.allclose(out[1], plain[1], atol=1e-5)  # no prior: the model without one


def test_dense_prompt_reaches_the_decoder() -> None:
    model = prior_model(skip=False)
    assert model.mask_decoder.prior_prompt.skip_weight is None
    with torch.no_grad():
        torch.nn.init.normal_(model.mask_decoder.prior_prompt.encode[-1].weight, std=0.5)
    images = torch.rand(1, 3, 64, 64)
    plain = model.segment(images, "Segment the defect.").probs
    out = model.segment(images, "Segment the defect.", priors=spot_prior(1)).probs
    assert float((out - plain).abs().max()) > 1e-3


def test_prior_keys_are_saved_and_loaded(tmp_path) -> None:
    model = prior_model()
    with torch.no_grad():
        model.mask_decoder.prior_prompt.skip_weight.fill_(0.7)
    model.save_trainable(tmp_path / "m")
    other = prior_model()
    other.load_trainable(tmp_path / "m")
    saved = model.mask_decoder.prior_prompt.skip_weight
    assert torch.equal(other.mask_decoder.prior_prompt.skip_weight, saved)


def test_prior_to_frame_follows_the_resize_rules() -> None:
    prior = torch.ones(2, 1, 20, 40)  # a wide image
    prior[1] = float("nan")
    stretch = prior_to_frame(prior, "stretch", 16)
    assert stretch.shape == (2, 1, 16, 16) and torch.allclose(stretch[0], torch.ones(1, 16, 16))
    padded = prior_to_frame(prior, "pad_square", 16)  # centred: rows 4..11 hold the image
    assert float(padded[0, 0, 0].abs().max()) == 0.0 and float(padded[0, 0, 8].min()) > 0.99
    longest = prior_to_frame(prior, "longest_side", 16)  # top-left: rows 0..7 hold the image
    assert float(longest[0, 0, 2].min()) > 0.99 and float(longest[0, 0, 12].abs().max()) == 0.0
    for framed in (stretch, padded, longest):
        assert bool(torch.isnan(framed[1]).all())  # "no prior" survives the mapping

"""OURS ``mask_decoder.mask_query: seg_state``: the mask read out by the H_seg prompt token."""

from __future__ import annotations

import pytest
import torch

from vmad.errors import ConfigError
from vmad.model.build import build_vmad
from vmad.model.config import MaskDecoderConfig
from vmad.model.mask_decoder import PromptedMaskDecoder
from vmad_testing import tiny_config


def decoder(query: str) -> PromptedMaskDecoder:
    torch.manual_seed(0)
    return PromptedMaskDecoder(MaskDecoderConfig(dim=32, mlp_dim=64, heads=2, mask_query=query)).eval()


def test_read_out_is_the_prompt_tokens_output() -> None:
    # The decoder's tokens carry no position, so swapping the prompt P with SAM's first mask token M swaps
    # their outputs: reading out the prompt (seg_state) with (M, P) must equal SAM's own read-out of the mask
    # token with (P, M). Checks the hand-written pass against SAM's and that the prompt token is read.
    by_state, by_token = decoder("seg_state"), decoder("mask_token")
    by_token.load_state_dict(by_state.state_dict())
    image = torch.randn(2, 32, 6, 6)
    mask_token = by_state.decoder.mask_tokens.weight[0].detach().clone()
    prompt = torch.randn(2, 1, 32)
    with torch.no_grad():
        by_token.decoder.mask_tokens.weight[0] = prompt[0, 0]
        swapped = by_token(image, mask_token.expand(2, 1, 32))
        read = by_state(image, prompt)
        assert torch.allclose(read[:1], swapped[:1], atol=1e-5)  # image 0: the swap holds
        assert float((read[1] - swapped[1]).abs().max()) > 1e-3  # image 1's prompt differs from P


def test_same_tensors_either_way_and_bad_choice_refused() -> None:
    cfg = tiny_config()
    plain = set(build_vmad(cfg).state_dict())
    cfg.mask_decoder.mask_query = "seg_state"
    assert set(build_vmad(cfg).state_dict()) == plain  # init_from weights of either kind fits
    cfg.mask_decoder.mask_query = "query"
    with pytest.raises(ConfigError, match="mask_query"):
        cfg.validate()

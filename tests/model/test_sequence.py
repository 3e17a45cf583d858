"""`splice` keeps embeddings, ids, attention and labels in step; `seg_positions` follows the real layout."""

from __future__ import annotations

import torch

from vmad.model.chat_format import IGNORE_INDEX
from vmad.model.sequence import TokenSequence, seg_positions, splice


def _sequence() -> TokenSequence:
    ids = torch.tensor([[5, 9, 6, 0], [9, 7, 8, 6]])
    embeds = ids[..., None].float().expand(-1, -1, 3).clone()
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 6]])
    return TokenSequence(embeds, ids, attention, labels)


def test_splice_replaces_the_placeholder_by_the_inserted_rows() -> None:
    seq = _sequence()
    insert = torch.tensor([[[1.0] * 3, [2.0] * 3], [[3.0] * 3, [4.0] * 3]])
    out = splice(seq, [1, 0], insert, insert_id=9, insert_attention=[True, True], replace=True)
    assert out.ids.tolist() == [[5, 9, 9, 6, 0], [9, 9, 7, 8, 6]]
    assert out.embeds[0, :, 0].tolist() == [5.0, 1.0, 2.0, 6.0, 0.0]
    assert out.embeds[1, :, 0].tolist() == [3.0, 4.0, 7.0, 8.0, 6.0]
    assert out.attention.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert out.labels is not None
    assert out.labels.tolist() == [[-100, -100, -100, 6, -100], [-100, -100, 7, 8, 6]]
    assert out.position_ids().tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 4]]


def test_splice_inserts_without_replacing_and_can_mask_the_slots() -> None:
    seq = _sequence()
    seq.labels = None
    insert = torch.full((2, 1, 3), 42.0)
    out = splice(seq, [2, 4], insert, insert_id=0, insert_attention=[True, False], replace=False)
    assert out.ids.tolist() == [[5, 9, 0, 6, 0], [9, 7, 8, 6, 0]]
    assert out.embeds[0, 2, 0] == 42.0 and out.embeds[1, 4, 0] == 42.0
    assert out.attention.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert out.labels is None


def test_seg_positions_at_or_before_the_token() -> None:
    ids = torch.tensor([[1, 2, 50, 3], [1, 2, 3, 4], [50, 1, 50, 2]])
    assert seg_positions(ids, 50, before_seg=False).tolist() == [2, -1, 0]
    assert seg_positions(ids, 50, before_seg=True).tolist() == [1, -1, -1]

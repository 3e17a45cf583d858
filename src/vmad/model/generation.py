"""Greedy decoding with a KV cache, and teacher-forced answer likelihoods (Eq. 3 at inference time).

When an answer emits ``<seg>``, the mask is decoded from H̄_seg (rule ``llm.seg_state``, the same as in
training) and, with the OURS mask prompt on, its prompt embeddings are fed into the cache right after
``<seg>`` so the rest of the answer is conditioned on the mask (the other samples' slots are masked out).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vmad.errors import VMADError
from vmad.model.chat_format import IGNORE_INDEX, dialogue_ids, stop_token_ids, tokenize_dialogues
from vmad.model.image_encoders import as_image_batch
from vmad.model.outputs import EncodedImages, GenerationResult
from vmad.model.scoring import image_scores

if TYPE_CHECKING:
    from vmad.model.vmad import VMADModel


def new_cache(model: VMADModel) -> Any:
    """An empty KV cache for the model's LLM."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.base_lm().config)
    except TypeError:  # older transformers
        return DynamicCache()


def cache_kwargs(decoder: Any, cache: Any) -> dict[str, Any]:
    """The keyword arguments that hand ``cache`` to ``decoder.forward`` (named ``cache`` in recent
    transformers, ``past_key_values`` before)."""
    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


@dataclass
class DecodeState:
    """Everything greedy decoding carries from one step to the next, per sample of the batch."""

    cache: Any
    attention: Tensor  # [B, T] grows by one column per step (and by the prompt length after <seg>)
    next_position: Tensor  # [B]
    last_hidden: Tensor  # [B, D] the state that predicts the next token
    done: Tensor  # [B] bool
    generated: list[list[int]]
    seg_states: list[Tensor | None]  # H̄_seg once <seg> was emitted
    probs: list[Tensor | None]  # mask probabilities once decoded

    def step(self, model: VMADModel, embeds: Tensor, fed: Tensor, advance_all: bool = True) -> Tensor:
        """Run ``embeds [B, N, D]`` through the LLM at the next positions (``fed [B]``: which samples attend
        to them); update cache, attention and positions (of every sample, or of the ``fed`` ones only);
        returns the new last hidden states ``[B, D]``."""
        n = embeds.shape[1]
        self.attention = torch.cat([self.attention, fed.to(self.attention.dtype)[:, None].expand(-1, n)], 1)
        positions = self.next_position[:, None] + torch.arange(n, device=embeds.device)
        hidden = model.run_llm(embeds, self.attention, positions, self.cache)[:, -1]
        advance = torch.ones_like(fed) if advance_all else fed
        self.next_position = torch.where(advance, self.next_position + n, self.next_position)
        return hidden


@torch.no_grad()
def generate(
    model: VMADModel, images: Tensor, question: str | Sequence[str], max_new_tokens: int = 64
) -> GenerationResult:
    """Greedy text answers (KV cache); when an answer contains ``<seg>``, its mask and image score."""
    images = as_image_batch(images)
    n = images.shape[0]
    questions = [question] * n if isinstance(question, str) else list(question)
    enc = tokenize_dialogues(model.tokenizer, model.chat_format, questions, None, padding_side="left")
    encoded = model.encode_images(images)
    seq = model.splice_images(
        enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device), encoded
    )
    positions = seq.position_ids()
    cache = new_cache(model)
    hidden = model.run_llm(seq.embeds, seq.attention, positions, cache)
    state = DecodeState(
        cache,
        seq.attention,
        positions[:, -1] + 1,
        hidden[:, -1],
        torch.zeros(n, dtype=torch.bool, device=model.device),
        [[] for _ in range(n)],
        [None] * n,
        [None] * n,
    )
    stop = stop_token_ids(model.tokenizer, model.chat_format)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    at_seg = model.config.llm.seg_state == "at_seg"
    for _ in range(max_new_tokens):
        token = model.logits(state.last_hidden).argmax(-1)
        token = torch.where(state.done, torch.full_like(token, pad), token)
        is_seg = (token == model.seg_token_id) & ~state.done
        for b in range(n):
            if not state.done[b]:
                state.generated[b].append(int(token[b]))
            if is_seg[b] and state.seg_states[b] is None and not at_seg:
                state.seg_states[b] = state.last_hidden[b]
        state.done = state.done | torch.tensor([int(t) in stop for t in token.tolist()], device=model.device)
        pending = any(bool(is_seg[b]) and state.seg_states[b] is None for b in range(n))
        if bool(state.done.all()) and not pending:
            break
        state.last_hidden = state.step(model, model.embed_tokens(token[:, None]), ~state.done | is_seg)
        for b in range(n):
            if is_seg[b] and state.seg_states[b] is None:
                state.seg_states[b] = state.last_hidden[b]
        fresh = [b for b in range(n) if bool(is_seg[b]) and state.probs[b] is None]
        if fresh and model.mask_prompt is not None:
            _feed_mask_prompt(model, state, encoded, fresh)
        if bool(state.done.all()):
            break
    return _result(model, state, encoded, stop)


def _feed_mask_prompt(model: VMADModel, state: DecodeState, encoded: EncodedImages, fresh: list[int]) -> None:
    """After ``<seg>`` (mask prompt on): the masks of the samples ``fresh``, then their prompt embeddings
    through the LLM; the other samples' slots are masked out and keep their last hidden state."""
    assert model.mask_prompt is not None
    rows = torch.tensor(fresh, device=model.device)
    probs = model.mask_probs(encoded.rows(rows), torch.stack([state.seg_states[b] for b in fresh]))
    for j, b in enumerate(fresh):
        state.probs[b] = probs[j]
    n = len(state.last_hidden)
    embeds = state.last_hidden.new_zeros(n, model.mask_prompt.n_tokens, state.last_hidden.shape[-1])
    embeds[rows] = model.mask_prompt(probs).to(embeds.dtype)
    fed = torch.zeros(n, dtype=torch.bool, device=model.device)
    fed[rows] = True
    hidden = state.step(model, embeds, fed, advance_all=False)
    state.last_hidden = torch.where(fed[:, None], hidden, state.last_hidden)


def _result(model: VMADModel, state: DecodeState, encoded: EncodedImages, stop: set[int]) -> GenerationResult:
    """Texts up to the first stop token; masks of answers with ``<seg>`` not decoded yet; image scores."""
    n = len(state.generated)
    pending = [b for b in range(n) if state.seg_states[b] is not None and state.probs[b] is None]
    if pending:
        rows = torch.tensor(pending, device=model.device)
        probs = model.mask_probs(encoded.rows(rows), torch.stack([state.seg_states[b] for b in pending]))
        for j, b in enumerate(pending):
            state.probs[b] = probs[j]
    scores = [None if p is None else float(image_scores(p[None], model.config.score)[0]) for p in state.probs]
    texts = []
    for ids in state.generated:
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        texts.append(model.tokenizer.decode(ids[:cut], skip_special_tokens=False).strip())
    return GenerationResult(texts=texts, token_ids=state.generated, probs=state.probs, scores=scores)


@torch.no_grad()
def answer_logprobs(
    model: VMADModel,
    images: Tensor,
    question: str | Sequence[str],
    answer: str | Sequence[str],
    after: str = "",
) -> Tensor:
    """Teacher-forced log-likelihood of ``answer`` per image (the text term of Eq. 6 as a sum): log p of the
    answer's tokens and its end token given the image and question, ``[B]``. ``after``: a start of every
    answer (e.g. ``"It is <seg>."``) whose tokens are conditioned on but not counted."""
    images = as_image_batch(images)
    n = images.shape[0]
    questions = [question] * n if isinstance(question, str) else list(question)
    answers = [answer] * n if isinstance(answer, str) else list(answer)
    tokenizer, fmt = model.tokenizer, model.chat_format
    skip = [0] * n
    if after:  # the supervised tokens of `after` as they appear inside each whole conversation
        ends_with_eos = bool(tokenizer.eos_token)
        for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
            head = [t for t in dialogue_ids(tokenizer, fmt, q, after)[1] if t != IGNORE_INDEX]
            head = head[:-1] if ends_with_eos else head
            labels = [t for t in dialogue_ids(tokenizer, fmt, q, a)[1] if t != IGNORE_INDEX]
            if labels[: len(head)] != head:
                raise VMADError(f"answer {a!r} does not start with the tokens of {after!r}")
            skip[i] = len(head)
    enc = tokenize_dialogues(tokenizer, fmt, questions, answers)
    device = model.device
    seq, hidden, _ = model.teacher_forced(
        images, enc["input_ids"].to(device), enc["attention_mask"].to(device), enc["labels"].to(device)
    )
    assert seq.labels is not None
    target = seq.labels[:, 1:]
    keep = target != IGNORE_INDEX
    logp = model.logits(hidden[:, :-1]).float().log_softmax(-1)
    token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    counted = keep & (keep.cumsum(-1) > torch.tensor(skip, device=keep.device)[:, None])
    return (token_logp * counted).sum(-1)

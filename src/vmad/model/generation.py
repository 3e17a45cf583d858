"""Greedy decoding with a KV cache, and teacher-forced answer likelihoods (Eq. 3 at inference time).

When an answer emits ``<seg>``, the mask is decoded from H̄_seg (rule ``llm.seg_state``, the same as in
training) and, with the OURS mask prompt on, its prompt embeddings are fed into the cache right after
``<seg>`` so the rest of the answer is conditioned on the mask (the other samples' slots are masked out).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class DecodeOptions:
    """How greedy decoding runs. The defaults are the CPU path (a ``DynamicCache``, eager steps); the GPU
    fast path (:func:`vmad.model.fastpath.enable_fast_path`) turns on a ``StaticCache`` sized for the prompt
    and the answer, and ``torch.compile`` of the one-token step (CUDA graphs with ``reduce-overhead``)."""

    static_cache: bool = False
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compiled: dict[str, Any] = field(default_factory=dict, repr=False)  # the compiled step, built once


def decode_options(model: VMADModel) -> DecodeOptions:
    """The model's :class:`DecodeOptions` (the CPU defaults when none were set)."""
    options = getattr(model, "decode_options", None)
    return options if isinstance(options, DecodeOptions) else DecodeOptions()


def new_cache(model: VMADModel, max_cache_len: int | None = None) -> Any:
    """An empty KV cache for the model's LLM: dynamic, or static with ``max_cache_len`` positions."""
    from transformers import DynamicCache

    config = model.base_lm().config
    if max_cache_len is not None:
        from transformers import StaticCache

        return StaticCache(config=config, max_cache_len=max_cache_len)
    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()


def cache_kwargs(decoder: Any, cache: Any) -> dict[str, Any]:
    """The keyword arguments that hand ``cache`` to ``decoder.forward`` (named ``cache`` in recent
    transformers, ``past_key_values`` before)."""
    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def compiled_step(model: VMADModel) -> Callable[..., Tensor]:
    """The one-token decoding step through the LLM, ``torch.compile``-d once per model (static shapes:
    the static cache and a fixed-width attention mask)."""
    options = decode_options(model)
    if "step" not in options.compiled:
        decoder = model.base_lm().model
        name = next(iter(cache_kwargs(decoder, object())))

        def step(embeds: Tensor, attention: Tensor, positions: Tensor, cache: Any) -> Tensor:
            kwargs = {name: cache, "use_cache": True}
            out = decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, **kwargs)
            return out.last_hidden_state

        options.compiled["step"] = torch.compile(step, mode=options.compile_mode, dynamic=False)
    return options.compiled["step"]


def _static_cache(model: VMADModel, options: DecodeOptions, batch: int, width: int) -> Any:
    """A ``StaticCache`` of ``width`` positions, reused (reset) by later calls with the same batch size and
    width, so a compiled step keeps its static addresses (CUDA graphs are not recorded again); at most four
    are kept."""
    key = f"cache:{batch}:{width}"
    cache = options.compiled.get(key)
    if cache is not None:
        cache.reset()
        return cache
    kept = [k for k in options.compiled if k.startswith("cache:")]
    for old in kept[: max(0, len(kept) - 3)]:
        del options.compiled[old]
    cache = options.compiled[key] = new_cache(model, width)
    return cache


@dataclass
class DecodeState:
    """Everything greedy decoding carries from one step to the next, per sample of the batch. Host-side
    lists hold the per-sample bookkeeping, so each step moves the new tokens to the host once."""

    cache: Any
    attention: Tensor  # [B, L] preallocated; the first `length` columns are in use
    length: int
    static: bool  # a static cache sees the whole [B, L] mask (fixed shapes); a dynamic one its used part
    next_position: Tensor  # [B]
    last_hidden: Tensor  # [B, D] the state that predicts the next token
    done: list[bool]
    generated: list[list[int]]
    seg_states: list[Tensor | None]  # H̄_seg once <seg> was emitted
    probs: list[Tensor | None]  # mask probabilities once decoded
    step_fn: Callable[..., Tensor] | None = None  # compiled one-token step, or None (eager)

    def visible_attention(self) -> Tensor:
        return self.attention if self.static else self.attention[:, : self.length]

    def step(self, model: VMADModel, embeds: Tensor, fed: Tensor, advance_all: bool = True) -> Tensor:
        """Run ``embeds [B, N, D]`` through the LLM at the next positions (``fed [B]``: which samples attend
        to them); update cache, attention and positions (of every sample, or of the ``fed`` ones only);
        returns the new last hidden states ``[B, D]``."""
        n = embeds.shape[1]
        self.attention[:, self.length : self.length + n] = fed.to(self.attention.dtype)[:, None]
        self.length += n
        positions = self.next_position[:, None] + torch.arange(n, device=embeds.device)
        if n == 1 and self.step_fn is not None:  # CUDA graphs reuse their output buffer: copy it
            hidden = self.step_fn(embeds, self.attention, positions, self.cache)[:, -1].clone()
        else:
            hidden = model.run_llm(embeds, self.visible_attention(), positions, self.cache)[:, -1]
        advance = torch.ones_like(fed) if advance_all else fed
        self.next_position = torch.where(advance, self.next_position + n, self.next_position)
        return hidden


def _start(
    model: VMADModel, encoded: EncodedImages, questions: list[str], max_new_tokens: int
) -> DecodeState:
    """Left-padded prompts with their visual tokens, the prefill (eager) and the decoding state."""
    n = len(questions)
    enc = tokenize_dialogues(model.tokenizer, model.chat_format, questions, None, padding_side="left")
    seq = model.splice_images(
        enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device), encoded
    )
    options = decode_options(model)
    prompt_len = seq.ids.shape[1]
    slots = model.mask_prompt.n_tokens * n if model.mask_prompt is not None else 0
    width = prompt_len + max_new_tokens + slots
    if options.static_cache:
        width = -(-width // 64) * 64  # fewer distinct shapes to compile
    attention = seq.attention.new_zeros(n, width)
    attention[:, :prompt_len] = seq.attention
    cache = _static_cache(model, options, n, width) if options.static_cache else new_cache(model)
    state = DecodeState(
        cache, attention, prompt_len, options.static_cache, seq.position_ids()[:, -1] + 1,
        seq.embeds.new_zeros(0), [False] * n, [[] for _ in range(n)], [None] * n, [None] * n,
        compiled_step(model) if options.static_cache and options.compile else None,
    )  # fmt: skip
    hidden = model.run_llm(seq.embeds, state.visible_attention(), seq.position_ids(), cache)
    state.last_hidden = hidden[:, -1]
    return state


@torch.no_grad()
def generate(
    model: VMADModel,
    images: Tensor,
    question: str | Sequence[str],
    max_new_tokens: int = 64,
    priors: Tensor | None = None,
    ignore_stop: bool = False,
    prefixes: Sequence[str | None] | None = None,
    encoded: EncodedImages | None = None,
    avoid: Sequence[str | None] | None = None,
) -> GenerationResult:
    """Greedy text answers (KV cache) for a batch (left padding; each sample's own ``<seg>``); when an
    answer contains ``<seg>``, its mask and image score (``priors``: :meth:`VMADModel.encode_images`).
    The batch's images are encoded once (F_I, Ψ and, when the first mask is needed, the backbone and neck
    for every sample at once); ``GenerationResult.encoded`` keeps them (``encoded``: reuse an earlier
    encoding of these images). ``prefixes`` (OURS): per sample, an opening the answer is forced to start
    with (None = free), e.g. the verdict chosen from the mask evidence; greedy decoding goes on after it.
    ``ignore_stop``: decode exactly ``max_new_tokens`` tokens (timing)."""
    images = as_image_batch(images)
    n = images.shape[0]
    questions = [question] * n if isinstance(question, str) else list(question)
    forced = _forced_tokens(model, prefixes, n)
    banned = [t[:1] for t in _forced_tokens(model, avoid, n)]
    if encoded is None:
        encoded = model.encode_images(images, priors)
    elif encoded.images.shape[0] != n:
        raise VMADError(f"encoded holds {encoded.images.shape[0]} images, not {n}")
    state = _start(model, encoded, questions, max_new_tokens)
    stop = set() if ignore_stop else stop_token_ids(model.tokenizer, model.chat_format)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    at_seg = model.config.llm.seg_state == "at_seg"
    for step in range(max_new_tokens):
        done = torch.tensor(state.done, device=model.device)
        token, ids = _next_tokens(model.logits(state.last_hidden), step, forced, banned, done, pad)
        is_seg = [not state.done[b] and ids[b] == model.seg_token_id for b in range(n)]
        for b in range(n):
            if not state.done[b]:
                state.generated[b].append(ids[b])
            if is_seg[b] and state.seg_states[b] is None and not at_seg:
                state.seg_states[b] = state.last_hidden[b]
        state.done = [d or t in stop for d, t in zip(state.done, ids, strict=True)]
        pending = any(is_seg[b] and state.seg_states[b] is None for b in range(n))
        if all(state.done) and not pending:
            break
        fed = torch.tensor([not d or s for d, s in zip(state.done, is_seg, strict=True)], device=model.device)
        state.last_hidden = state.step(model, model.embed_tokens(token[:, None]), fed)
        for b in range(n):
            if is_seg[b] and state.seg_states[b] is None:
                state.seg_states[b] = state.last_hidden[b]
        fresh = [b for b in range(n) if is_seg[b] and state.probs[b] is None]
        if fresh and model.mask_prompt is not None:
            _feed_mask_prompt(model, state, encoded, fresh)
        if all(state.done):
            break
    return _result(model, state, encoded, stop)


def _next_tokens(
    logits: Tensor, step: int, forced: list[list[int]], banned: list[list[int]], done: Tensor, pad: int
) -> tuple[Tensor, list[int]]:
    """The greedy tokens of one step (pad for finished samples), with the forced openings and the excluded
    first tokens of :func:`generate`; also as a host list (the one device-to-host copy of the step)."""
    for b, ban in enumerate(banned):
        if ban and step == len(forced[b]):
            logits[b, ban[0]] = float("-inf")
    token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
    ids = token.tolist()
    if any(step < len(f) for f in forced):
        ids = [f[step] if step < len(f) and not d else t
               for f, d, t in zip(forced, done.tolist(), ids, strict=True)]
        token = torch.tensor(ids, device=logits.device, dtype=token.dtype)
    return token, ids


def _forced_tokens(model: VMADModel, prefixes: Sequence[str | None] | None, n: int) -> list[list[int]]:
    """Token ids of each sample's text (``prefixes`` / ``avoid`` of :func:`generate`; empty = none)."""
    if prefixes is None:
        return [[] for _ in range(n)]
    if len(prefixes) != n:
        raise VMADError(f"prefixes / avoid has {len(prefixes)} entries for {n} images")
    return [[] if p is None else model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prefixes]


def _mask_probs(model: VMADModel, state: DecodeState, encoded: EncodedImages, rows: list[int]) -> Tensor:
    """Mask probabilities of the samples ``rows`` from their H̄_seg; the image embeddings (frozen backbone
    and neck) are computed for the whole batch the first time, so each image goes through them once."""
    if encoded.embeddings is None:
        encoded.embeddings = model.image_embeddings(encoded)
    index = torch.tensor(rows, device=model.device)
    return model.mask_probs(encoded.rows(index), torch.stack([state.seg_states[b] for b in rows]))


def _feed_mask_prompt(model: VMADModel, state: DecodeState, encoded: EncodedImages, fresh: list[int]) -> None:
    """After ``<seg>`` (mask prompt on): the masks of the samples ``fresh``, then their prompt embeddings
    through the LLM; the other samples' slots are masked out and keep their last hidden state."""
    assert model.mask_prompt is not None
    rows = torch.tensor(fresh, device=model.device)
    probs = _mask_probs(model, state, encoded, fresh)
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
        probs = _mask_probs(model, state, encoded, pending)
        for j, b in enumerate(pending):
            state.probs[b] = probs[j]
    priors = encoded.priors
    scores = [
        None if p is None
        else float(image_scores(p[None], model.config.score, None if priors is None else priors[b : b + 1]))
        for b, p in enumerate(state.probs)
    ]
    texts = []
    for ids in state.generated:
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        texts.append(model.tokenizer.decode(ids[:cut], skip_special_tokens=False).strip())
    return GenerationResult(
        texts=texts, token_ids=state.generated, probs=state.probs, scores=scores, encoded=encoded
    )


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

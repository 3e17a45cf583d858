"""The user-facing inference API: :class:`Detector` (detect, chat) and :func:`build_scorer` for ``vmad eval``.

An image travels ``Detector -> VMADModel.segment / generate`` (Eq. 1-5) and comes back as a
:class:`Detection`: the mask probability map at the input size, the binary mask, the image score and, in
answer mode, the generated text. The model is loaded once per :class:`Detector`.

Large images (OURS): an image of more than ``DetectorConfig.max_pixels`` pixels (default 2048 x 2048) is
reduced by an integer factor (box average) before any model work; files are decoded at the reduced size
(:func:`vmad.data.io.read_image_bounded`: JPEG draft mode, then ``Image.reduce``). Its Detection's ``mask`` is
at the input size (the reduced probability map upsampled bilinearly, then thresholded, strip by strip), but
its ``probability_map`` stays at the reduced size (``processed_size``; :meth:`Detection.full_probability_map`
upsamples it) and the image score is computed at the reduced size. Images at or below the limit are
processed exactly as without it.

Rules (OURS unless stated; every value is a :class:`DetectorConfig` field):

- Questions. Segmentation-only mode asks the paper's segmentation-only template (Sec. V-A.2) with the object
  name filled in (``class_name`` with ``_``/``-`` as spaces); with no class name the object is called
  ``"object"`` (``default_object``). Answer mode's default question is the paper's segmentation + answer
  template with query type ``answer_query`` ("description"), so the answer speaks of the image.
- Segmentation-only mode is the fast path: one teacher-forced forward (``VMADModel.segment``).
- Answer mode runs ``VMADModel.generate`` (greedy). When the generated answer holds ``<seg>``, the mask comes
  from that ``<seg>`` state (``mask_from == "answer"``); when it does not, the mask and score come from the
  segment path asked the segmentation-only question for the same object (``mask_from == "segment"``), so
  every Detection has a mask.
- Binary mask: ``probability > threshold`` (default 0.5, i.e. mask logit > 0).
- Image score: the model's own rule (``model.config.score``, default max of the Gaussian-smoothed
  probability map at the input size).
- Batching: images are processed ``batch_size`` at a time; within a batch, images of the same size share one
  forward (different sizes run separately, so results equal one-by-one processing).
- Chat: the model's prompt builder takes one user turn, so earlier turns are written into the question text in
  the template's own multi-turn markup (LLaVA v1 ``... ASSISTANT: a</s>USER: q``, or ChatML), which gives the
  template's real multi-turn layout with the image in the first user turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vmad.config import check_choices, from_mapping
from vmad.data.io import read_image, read_image_bounded, reduce_image, reduction_factor, to_rgb_array
from vmad.data.prompts import QUERY_TYPES, SEG_ANSWER_QUESTION, SEG_QUESTION
from vmad.data.text import describe_location, describe_size, mask_facts, number_word, object_name
from vmad.errors import ConfigError, VMADError
from vmad.eval.scorer import ScoreOutput
from vmad.model.build import load_pretrained
from vmad.model.vmad import VMADModel
from vmad.model.weights_io import CONFIG_NAME, PACKAGED_MODELS, resolve_model_path

ImageInput = str | Path | np.ndarray | Image.Image | torch.Tensor
SCORE_RULE_TEXT = {
    "max_smoothed": "max of the mask probability map after a Gaussian blur of sigma pixels (input size)",
    "max": "max of the mask probability map",
    "mean_topk": "mean of the top topk_ratio fraction of mask probabilities",
}

AnswerQuery = Literal["description", "impact", "suggestion"]  # the keys of QUERY_TYPES


@dataclass
class DetectorConfig:
    """Inference settings (all OURS).

    Attributes:
        threshold: binary mask = probability > threshold.
        batch_size: images per forward when detecting lists / folders.
        max_new_tokens: answer-mode generation length.
        answer_query: query type of the default answer-mode question (one of ``QUERY_TYPES``).
        default_object: object name used in the default questions when no class name is given.
        device: ``auto`` (CUDA when available, else CPU), or a torch device string; :meth:`torch_device`
            refuses (ConfigError) a CUDA / MPS device this torch cannot use.
        max_pixels: images with more pixels (H * W) are reduced below this before the model runs (see the
            module rules on large images); default 4_194_304 = 2048 x 2048.
    """

    threshold: float = 0.5
    batch_size: int = 4
    max_new_tokens: int = 96
    answer_query: AnswerQuery = "description"
    default_object: str = "object"
    device: str = "auto"
    max_pixels: int = 4_194_304

    def validate(self) -> DetectorConfig:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        check_choices(self, "detector")
        if not self.default_object.strip():
            raise ConfigError("default_object must not be empty")
        return self

    def torch_device(self) -> torch.device:
        """The torch device; ConfigError for a malformed name or a CUDA / MPS device not usable here."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"device {self.device!r}: {exc}") from None
        check_device_available(dev, self.device)
        return dev


def check_device_available(dev: torch.device, name: str | None = None) -> None:
    """ConfigError when ``dev`` is a CUDA device (or index) or MPS that this torch / machine does not have."""
    name = name or str(dev)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "CUDA is not available" if torch.backends.cuda.is_built() else (
                f"this torch ({torch.__version__}) was built without CUDA")
            raise ConfigError(f"device {name!r}: {built}; use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {name!r}: only {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r}: MPS is not available; use --device cpu or auto")


@dataclass
class Detection:
    """One image's result. ``mask`` (H, W) bool is at the input image's size; ``probability_map`` float32
    is at the input size too, except for an image above ``DetectorConfig.max_pixels``, which was reduced
    before the model ran: then ``processed_size`` is the reduced (h, w), ``probability_map`` is (h, w) (use
    :meth:`full_probability_map` for the input size) and ``processed_mask`` is its thresholded (h, w) mask;
    ``processed_size`` is None otherwise. ``answer`` is the generated text (None in segmentation-only mode);
    ``source`` the image file (None for arrays); ``mask_from``: ``"segment"`` or ``"answer"`` (see the
    module rules)."""

    anomaly_score: float
    mask: np.ndarray
    probability_map: np.ndarray
    answer: str | None = None
    source: str | None = None
    question: str = ""
    mask_from: str = "segment"
    processed_size: tuple[int, int] | None = None
    processed_mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def downscaled(self) -> bool:
        """True when the image was reduced before the model ran (see the class docstring)."""
        return self.processed_size is not None

    def full_probability_map(self) -> np.ndarray:
        """``probability_map`` at the input size (bilinear upsampling for a downscaled image; else the map
        itself)."""
        if not self.downscaled:
            return self.probability_map
        return _upsample(self.probability_map, self.size)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def mask_description(self) -> str:
        """What the predicted mask shows, computed from the mask alone (not the LLM's words): regions
        (8-connected), where on a 3x3 grid, and their extent."""
        facts = self._facts()
        if facts is None:
            return "The mask is empty: no pixel is above the threshold."
        regions = "one region" if facts.count == 1 else f"{number_word(facts.count)} regions"
        return f"The mask marks {regions} at {describe_location(facts)} ({describe_size(facts)})."

    def _facts(self) -> Any:
        """Mask facts; for a downscaled image from the reduced mask (cheap), area and box scaled to the
        input size."""
        if self.processed_mask is None:
            return mask_facts(self.mask)
        facts = mask_facts(self.processed_mask)
        if facts is None:
            return None
        (h, w), (height, width) = self.processed_mask.shape, self.size
        sy, sx = height / h, width / w
        box = (round(facts.box[0] * sx), round(facts.box[1] * sy))
        return replace(facts, area=int(self.mask.sum()), box=box)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (no arrays); ``processed_size`` is [h, w] for a downscaled image, else None."""
        return {
            "source": self.source,
            "score": float(self.anomaly_score),
            "height": int(self.mask.shape[0]),
            "width": int(self.mask.shape[1]),
            "mask_pixels": int(self.mask.sum()),
            "mask_from": self.mask_from,
            "question": self.question,
            "answer": self.answer,
            "mask_description": self.mask_description,
            "downscaled": self.downscaled,
            "processed_size": list(self.processed_size) if self.processed_size else None,
        }


@dataclass
class ChatTurn:
    """One chat turn: the user's question, the model's answer, its Detection, and the history to pass to the
    next :meth:`Detector.chat` call (earlier turns + this one)."""

    question: str
    answer: str
    detection: Detection
    history: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ images


def _unit_range(t: torch.Tensor, what: str) -> torch.Tensor:
    """Pixel values -> float32 in [0, 1], checked (VMADError otherwise): uint8 is 0-255; other integer dtypes
    are taken as 0-255 too, but only when every value is in [0, 255]; floating point must be finite and in
    [0, 1] (it is never rescaled or clipped); bool and complex are refused."""
    if t.dtype == torch.bool or t.is_complex():
        raise VMADError(f"image {what} of dtype {t.dtype} is not an image; give uint8 0-255 or float 0-1")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        lo, hi = int(t.long().min()), int(t.long().max())
        if lo < 0 or hi > 255:
            raise VMADError(
                f"image {what} of dtype {t.dtype} has values in [{lo}, {hi}]; integer images must be 0-255"
            )
        return t.float() / 255.0
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise VMADError(
            f"image {what} has {n_nan} NaN and {n_inf} infinite value(s); pixels must be finite, in [0, 1]"
        )
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise VMADError(
            f"float image {what} has values in [{lo:g}, {hi:g}]; float images must be in [0, 1] "
            "(divide 0-255 data by 255, or give uint8)"
        )
    return t


_STRIP_ROWS = 512


def _upsample(probs: np.ndarray, size: tuple[int, int], threshold: float | None = None) -> np.ndarray:
    """(h, w) float32 probabilities bilinearly upsampled to ``size`` (H, W) (PIL, strip by strip, each strip
    the matching rows of one full resize); with ``threshold``, the (H, W) bool ``> threshold`` instead, so
    no full-size float map is ever held."""
    height, width = size
    h, w = probs.shape
    im = Image.fromarray(np.ascontiguousarray(probs, dtype=np.float32))
    out = np.empty((height, width), dtype=np.float32 if threshold is None else bool)
    sy = h / height
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        strip = np.asarray(
            im.resize((width, y1 - y0), Image.Resampling.BILINEAR, box=(0.0, y0 * sy, float(w), y1 * sy))
        )
        out[y0:y1] = strip if threshold is None else strip > threshold
    return out


def _reduce_tensor(t: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """[3, H, W] float reduced below ``max_pixels`` (area average); ``t`` itself at or below the limit."""
    height, width = t.shape[-2:]
    factor = reduction_factor(height, width, max_pixels)
    if factor == 1:
        return t
    size = (-(-height // factor), -(-width // factor))
    return torch.nn.functional.interpolate(t[None].float(), size=size, mode="area")[0]


def _load(image: ImageInput, max_pixels: int | None) -> tuple[torch.Tensor, str | None, tuple[int, int]]:
    """:func:`_as_tensor` with the large-image guard: ``(tensor at most max_pixels, source, input (H, W))``.
    Files are decoded at a bounded size; PIL images and uint8 arrays are reduced before conversion to float;
    other inputs after."""
    if isinstance(image, (str, Path)):
        arr, size = read_image_bounded(image, max_pixels)
        t, _ = _as_tensor(arr)
        return t, str(image), size
    if max_pixels is None:
        t, source = _as_tensor(image)
        return t, source, tuple(t.shape[-2:])  # type: ignore[return-value]
    if isinstance(image, Image.Image):
        size = (image.height, image.width)
        t, source = _as_tensor(reduce_image(image, max_pixels))
        return t, source, size
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        size = (int(image.shape[0]), int(image.shape[1]))
        if reduction_factor(*size, max_pixels) > 1 and (image.ndim == 2 or image.shape[2] in (1, 3, 4)):
            arr = image[:, :, :3] if image.ndim == 3 and image.shape[2] >= 3 else image.reshape(size)
            t, source = _as_tensor(np.array(reduce_image(Image.fromarray(np.ascontiguousarray(arr)),
                                                         max_pixels)))
            return t, source, size
    t, source = _as_tensor(image)
    size = tuple(t.shape[-2:])
    return _reduce_tensor(t, max_pixels), source, size  # type: ignore[return-value]


def _as_tensor(image: ImageInput) -> tuple[torch.Tensor, str | None]:
    """Any accepted input -> ``([3, H, W] float in [0, 1], source path or None)``.

    Paths are read with :func:`vmad.data.read_image`; arrays are (H, W, 3|4) or (H, W), tensors ``[3, H, W]``
    or ``[1, H, W]`` / ``[H, W]``. Pixel values (arrays and tensors alike) are checked, never clipped:
    uint8 is 0-255; other integer dtypes (int64, uint16, ...) are accepted as 0-255 only when every value is
    in [0, 255], else VMADError; float must be finite (no NaN / inf) and in [0, 1], else VMADError naming
    the range found."""
    source = None
    if isinstance(image, (str, Path)):
        source = str(image)
        image = read_image(image)
    elif isinstance(image, Image.Image):
        image = to_rgb_array(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] not in (1, 3) or min(t.shape[1:]) < 1:
            raise VMADError(f"image tensor must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
        return _unit_range(t, "tensor").expand(3, -1, -1), source
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise VMADError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = arr[:, :, :3] if arr.shape[2] >= 3 else np.repeat(arr, 3, axis=2)
    if arr.dtype.kind not in "biufc":
        raise VMADError(f"image array of dtype {arr.dtype} is not an image; give uint8 0-255 or float 0-1")
    if arr.dtype.kind in "iu" and arr.dtype != np.uint8:  # checked here: torch lacks min/max for uint16+
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise VMADError(
                f"image array of dtype {arr.dtype} has values in [{lo}, {hi}]; integer images must be 0-255"
            )
        arr = arr.astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return _unit_range(t, "array"), source


def _check_question(question: str | None) -> None:
    if question is not None and not question.strip():
        raise VMADError("the question must not be empty (None asks the default question)")


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, Path, Image.Image)):
        return True
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3


# ------------------------------------------------------------------------------------------ detector


class Detector:
    """Masks, scores and answers for images, with a model loaded once (segment-anything-style predictor).

    >>> det = Detector.from_pretrained("small")               # or a checkpoint folder
    >>> [d] = det.detect("bottle.png", class_name="bottle")   # segmentation only (fast path)
    >>> d.anomaly_score, d.mask.shape
    """

    def __init__(self, model: VMADModel, config: DetectorConfig | None = None, name: str = "model") -> None:
        self.model = model.eval()
        self.config = (config or DetectorConfig()).validate()
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "small",
        device: str | torch.device | None = None,
        config: DetectorConfig | None = None,
        **build_kwargs: Any,
    ) -> Detector:
        """Load ``"small"`` (packaged weights) or a checkpoint folder (``save_trainable`` / training's
        ``final/``). ``device`` None = ``config.device``; ``build_kwargs`` go to ``build_vmad`` (e.g.
        ``llava_path``/``sam_path`` for a paper-preset checkpoint)."""
        config = (config or DetectorConfig()).validate()
        folder = resolve_model_path(model)
        dev = torch.device(device) if device is not None else config.torch_device()
        vmad = load_pretrained(folder, device=dev, **build_kwargs)
        return cls(vmad, config, name=str(model))

    # ------------------------------------------------------------- questions
    def object_name(self, class_name: str | None) -> str:
        return object_name(class_name) if class_name else self.config.default_object

    def default_question(self, class_name: str | None = None, answer: bool = False) -> str:
        """The paper's segmentation-only template, or (``answer``) its segmentation + answer template with
        query type ``config.answer_query`` (Sec. V-A.2), with the object name filled in."""
        obj = self.object_name(class_name)
        if answer:
            return SEG_ANSWER_QUESTION.format(object=obj, query_type=QUERY_TYPES[self.config.answer_query])
        return SEG_QUESTION.format(object=obj)

    # ------------------------------------------------------------- detect
    def detect(
        self,
        images: ImageInput | Sequence[ImageInput],
        question: str | None = None,
        answer: bool = False,
        class_name: str | None = None,
        *,
        max_new_tokens: int | None = None,
        original_sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[Detection]:
        """Detect anomalies in one image or a list (paths, (H, W[, 3]) uint8 arrays, PIL images, [3, H, W]
        tensors in [0, 1]; pixel values are checked as :func:`_as_tensor` says: NaN / inf, out-of-range floats
        and integers outside 0-255 raise VMADError). ``question`` None = :meth:`default_question`; an empty
        question is a VMADError. ``answer`` False = segmentation only (one forward); True = generated answer
        + mask (see the module rules). One Detection per image, in order; ``Detection.question`` is the
        question asked. Images above ``config.max_pixels`` are reduced first (module rules on large
        images). ``original_sizes`` (one (H, W) or None per image) is for callers that reduced an image
        themselves (e.g. :func:`vmad.data.io.read_image_bounded`): the mask is returned at that size."""
        _check_question(question)
        items = [images] if _is_single(images) else list(images)  # type: ignore[arg-type]
        limit = self.config.max_pixels
        loaded = [_load(x, limit) for x in items]
        if original_sizes is not None:
            if len(original_sizes) != len(loaded):
                raise VMADError(f"original_sizes has {len(original_sizes)} entries for {len(loaded)} images")
            loaded = [(t, s, tuple(o) if o is not None else hw)
                      for (t, s, hw), o in zip(loaded, original_sizes, strict=True)]
        q = question if question is not None else self.default_question(class_name, answer)
        fallback_q = self.default_question(class_name, answer=False)
        tokens = max_new_tokens or self.config.max_new_tokens
        out: list[Detection | None] = [None] * len(loaded)
        bs = self.config.batch_size
        for start in range(0, len(loaded), bs):
            groups: dict[tuple[int, int], list[int]] = {}
            for i in range(start, min(start + bs, len(loaded))):
                groups.setdefault(tuple(loaded[i][0].shape[-2:]), []).append(i)
            for idx in groups.values():
                batch = torch.stack([loaded[i][0] for i in idx])
                sizes = [loaded[i][2] for i in idx]
                # sizes only for reduced images: full-size ones take exactly the former path
                extra = {} if all(s == tuple(batch.shape[-2:]) for s in sizes) else {"sizes": sizes}
                results = (
                    self._answer(batch, q, fallback_q, tokens, **extra)
                    if answer else self._segment(batch, q, **extra)
                )
                for i, det in zip(idx, results, strict=True):
                    det.source = loaded[i][1]
                    out[i] = det
        return out  # type: ignore[return-value]

    def _detection(
        self, probs: torch.Tensor, score: float, question: str, size: tuple[int, int] | None = None, **kw: Any
    ) -> Detection:
        p = probs.detach().float().cpu().numpy().astype(np.float32, copy=False)
        mask = p > self.config.threshold
        if size is None or tuple(size) == p.shape:
            return Detection(float(score), mask, p, question=question, **kw)
        full = _upsample(p, size, self.config.threshold)
        return Detection(float(score), full, p, question=question, processed_size=p.shape,  # type: ignore[arg-type]
                         processed_mask=mask, **kw)

    def _segment(
        self, images: torch.Tensor, question: str, sizes: Sequence[tuple[int, int] | None] | None = None
    ) -> list[Detection]:
        sizes = sizes or [None] * len(images)
        res = self.model.segment(images, question)
        return [self._detection(res.probs[i], float(res.scores[i]), question, sizes[i])
                for i in range(len(images))]

    def _answer(
        self, images: torch.Tensor, question: str, fallback: str, tokens: int,
        sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[Detection]:
        sizes = sizes or [None] * len(images)
        gen = self.model.generate(images, question, max_new_tokens=tokens)
        missing = [i for i, p in enumerate(gen.probs) if p is None]
        seg = self.model.segment(images[missing], fallback) if missing else None
        out = []
        for i in range(len(images)):
            if gen.probs[i] is not None:
                det = self._detection(
                    gen.probs[i], float(gen.scores[i]), question, sizes[i], mask_from="answer"
                )
            else:
                j = missing.index(i)
                det = self._detection(seg.probs[j], float(seg.scores[j]), question, sizes[i])  # type: ignore[union-attr]
            det.answer = gen.texts[i]
            out.append(det)
        return out

    # ------------------------------------------------------------- chat
    def fold_history(self, history: Sequence[tuple[str, str]], question: str) -> str:
        """The question text that carries earlier turns in the model's chat format (see
        :meth:`vmad.model.chat_format.ChatFormat.fold_history`)."""
        return self.model.chat_format.fold_history(history, question, self.model.tokenizer.eos_token or "")

    def chat(
        self,
        image: ImageInput,
        history: Sequence[tuple[str, str]] | None,
        question: str,
        *,
        class_name: str | None = None,
        max_new_tokens: int | None = None,
    ) -> ChatTurn:
        """Answer ``question`` about ``image`` given earlier ``(question, answer)`` turns; the returned
        :class:`ChatTurn` carries the updated history. The mask follows the answer-mode rule."""
        _check_question(question)
        history = list(history or [])
        tensor, source, size = _load(image, self.config.max_pixels)
        folded = self.fold_history(history, question)
        tokens = max_new_tokens or self.config.max_new_tokens
        [det] = self._answer(tensor[None], folded, self.default_question(class_name), tokens, [size])
        det.source, det.question = source, question
        reply = det.answer or ""
        return ChatTurn(question, reply, det, [*history, (question, reply)])


# ------------------------------------------------------------------------------------------ eval scorer


class VMADScorer:
    """:class:`vmad.eval.scorer.Scorer` over a :class:`Detector` (segmentation-only path). Image score = the
    model's image score; anomaly map = the mask probability map at the input size. The model is loaded by
    :meth:`prepare` (timed by the engine as setup) or on first use."""

    def __init__(self, model: str | Path = "small", config: DetectorConfig | None = None,
                 detector: Detector | None = None) -> None:
        self.model_ref = str(model)
        self.config = (config or DetectorConfig()).validate()
        self.path = resolve_model_path(model) if detector is None else None
        self.detector = detector
        packaged = self.model_ref in PACKAGED_MODELS
        self.name = f"vmad-{self.model_ref if packaged else Path(self.model_ref).name or self.model_ref}"

    def prepare(self) -> None:
        if self.detector is None:
            self.detector = Detector.from_pretrained(self.path or self.model_ref, config=self.config)

    def score(self, images: Sequence[np.ndarray], class_name: str) -> ScoreOutput:
        self.prepare()
        dets = self.detector.detect(list(images), class_name=class_name)  # type: ignore[union-attr]
        return ScoreOutput(
            image_scores=np.array([d.anomaly_score for d in dets], dtype=np.float64),
            anomaly_maps=[d.full_probability_map() for d in dets],  # type: ignore[arg-type]
        )

    def _score_config(self) -> dict[str, Any]:
        if self.detector is not None:
            return asdict(self.detector.model.config.score)
        if self.path is not None:
            meta = json.loads((self.path / CONFIG_NAME).read_text(encoding="utf-8"))
            return dict(meta.get("config", {}).get("score", {}))
        return {}

    def settings(self) -> dict:
        score = self._score_config()
        return {
            "model": self.model_ref,
            "weights": str(self.path) if self.path is not None else None,
            "mode": "segmentation-only (VMADModel.segment, one forward per batch)",
            "question_template": SEG_QUESTION,
            "object_name": "class name with '_'/'-' as spaces",
            "score_rule": score,
            "score_description": SCORE_RULE_TEXT.get(score.get("rule", ""), "model image score"),
            "anomaly_map": "mask probability (sigmoid of M_decoder logits) at the input image size",
            **{k: v for k, v in asdict(self.config).items() if k in ("batch_size", "device")},
        }


def build_scorer(name_or_path: str | Path = "small", **options: Any) -> VMADScorer:
    """The ``vmad eval --model NAME_OR_PATH`` scorer; ``options`` are :class:`DetectorConfig` fields (strings
    are converted). The weights folder is checked now; the model is loaded by ``prepare()``."""
    return VMADScorer(name_or_path, from_mapping(DetectorConfig, options, "detector"))

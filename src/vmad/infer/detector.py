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
- Score space (``model.score.space``): with ``logit`` the segmentation path also keeps the mask logits and
  the score's log-odds (``Detection.logit_map``, ``Detection.score_logit``), and :class:`VMADScorer` hands
  those to the evaluation: ranking metrics then see no ties where probabilities saturate at 1.
- Verdict: ``"anomalous"`` when the image score is ``> image_threshold``, else ``"normal"``; no threshold, no
  verdict (None). :meth:`Detector.calibrate` derives both thresholds from a few normal images of the object,
  :meth:`Detector.load_threshold_file` reads them from a ``vmad calibrate`` file (rule:
  :mod:`vmad.infer.calibration`); ``Detection.verdict`` and ``Detection.image_threshold`` report them.
- Answers: :meth:`Detector.detect` defaults to segmentation only (``answer=False``, the fast path);
  ``vmad detect`` defaults to answers (``--no-answer`` for segmentation only), as its ``--help`` says.
- One API for every method: :meth:`Detector.from_baseline` (``"musc"``) gives the same ``detect`` /
  ``calibrate`` / ``load_threshold_file`` and :class:`Detection` objects (:mod:`vmad.infer.baseline`).
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
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from vmad.config import check_choices, from_mapping
from vmad.data.prompts import QUERY_TYPES, SEG_ANSWER_QUESTION, SEG_QUESTION
from vmad.data.text import object_name
from vmad.errors import ConfigError, VMADError
from vmad.eval.scorer import ScoreOutput
from vmad.infer.calibration import DEFAULT_FPR, Calibration, file_sha256, make_calibration
from vmad.infer.detection import (  # noqa: F401  (Detection and ImageInput are part of this module's API)
    Detection,
    ImageInput,
    _check_question,
    _is_single,
    _load,
    make_detection,
)
from vmad.model.build import load_pretrained
from vmad.model.outputs import SegmentationResult
from vmad.model.vmad import VMADModel
from vmad.model.weights_io import CONFIG_NAME, PACKAGED_MODELS, WEIGHTS_NAME, resolve_model_path

if TYPE_CHECKING:
    from vmad.baselines.prior import Priors
    from vmad.infer.baseline import BaselineDetector

SCORE_RULE_TEXT = {
    "max_smoothed": "max of the mask probability map after a Gaussian blur of sigma pixels (input size)",
    "max": "max of the mask probability map",
    "mean_topk": "mean of the top topk_ratio fraction of mask probabilities",
}

AnswerQuery = Literal["description", "impact", "suggestion"]  # the keys of QUERY_TYPES


PriorUse = Literal["folder", "folder+self", "self", "off"]
PRIOR_USES: tuple[str, ...] = get_args(PriorUse)
AnswerVerdict = Literal["model", "evidence"]
#: how a normal answer opens in the training data (:func:`vmad.data.text.normal_answers`)
NORMAL_OPENING = "No defect was found"


@dataclass
class DetectorConfig:
    """Inference settings (all OURS).

    Attributes:
        threshold: binary mask = probability > threshold.
        image_threshold: verdict threshold on the image score (``score > image_threshold`` is
            ``"anomalous"``); None = no verdict. Set by :meth:`Detector.calibrate` or
            :meth:`Detector.load_threshold_file`, or by hand.
        batch_size: images per forward when detecting lists / folders.
        max_new_tokens: answer-mode generation length.
        answer_query: query type of the default answer-mode question (one of ``QUERY_TYPES``).
        default_object: object name used in the default questions when no class name is given.
        device: ``auto`` (CUDA when available, else CPU), or a torch device string; :meth:`torch_device`
            refuses (ConfigError) a CUDA / MPS device this torch cannot use.
        max_pixels: images with more pixels (H * W) are reduced below this before the model runs (see the
            module rules on large images); default 4_194_304 = 2048 x 2048.
        prior: OURS, only for models trained with ``mask_decoder.prior_prompt``: ``folder`` = each image's
            normality prior by mutual scoring over the images of the same :meth:`Detector.detect` call
            (:mod:`vmad.baselines.prior`; a single image, or one unlike every other, gets none);
            ``folder+self`` = the same, and such an image gets a self prior from its own patches; ``self`` =
            every image as if it came alone (its prior against the references, else its self prior);
            ``off`` = never.
        prior_group_size: OURS, :class:`VMADScorer` (``vmad eval``) with priors: a class of more than this
            many images is scored in interleaved groups of at most that many, each group's priors by mutual
            scoring within it (bounds the memory of the prior pass); 0 = the whole class at once (default,
            the setting of every recorded result).
        answer_verdict: OURS, answer mode only: ``model`` = the LLM alone chooses between the segmentation
            answer (``llm.seg_answer``, "It is <seg>.") and a normal answer ("No defect was found ...");
            ``evidence`` = the segmentation-only forward runs first and its verdict (``score >
            image_threshold`` when a threshold is set, else a non-empty binary mask) fixes whether the answer
            says "No defect was found" after "It is <seg>."; the LLM writes the rest. Only for the default
            segmentation + answer question (:meth:`Detector.default_question`), not for other questions
            or chat follow-up turns.
        image_threshold_without_prior, threshold_without_prior: OURS, a model with a normality prior: the
            verdict and mask thresholds for an image that gets no prior (its score is on the decoder's own
            scale); None = ``image_threshold`` / ``threshold``. Set by :meth:`Detector.calibrate`.
        refine: OURS, only for models with a mask refiner (``mask_decoder.refiner``): True (default) = the
            binary masks from the refined logits (maps and image scores stay the decoder's); False = the
            masks from the decoder's own logits.
    """

    threshold: float = 0.5
    image_threshold: float | None = None
    batch_size: int = 4
    max_new_tokens: int = 96
    answer_query: AnswerQuery = "description"
    default_object: str = "object"
    device: str = "auto"
    max_pixels: int = 4_194_304
    prior: PriorUse = "folder"
    prior_group_size: int = 0
    answer_verdict: AnswerVerdict = "model"
    image_threshold_without_prior: float | None = None
    threshold_without_prior: float | None = None
    refine: bool = True

    def validate(self) -> DetectorConfig:
        if self.prior_group_size < 0 or self.prior_group_size == 1:
            raise ConfigError(f"prior_group_size (vmad eval --group-size) must be 0 (all at once) or at "
                              f"least 2 (images are scored against each other), got {self.prior_group_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        for name in ("image_threshold", "image_threshold_without_prior"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number or None, got {value}")
        alone = self.threshold_without_prior
        if alone is not None and not 0.0 <= alone <= 1.0:
            raise ConfigError(f"threshold_without_prior must be in [0, 1], got {alone}")
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
class ChatTurn:
    """One chat turn: the user's question, the model's answer, its Detection, and the history to pass to the
    next :meth:`Detector.chat` call (earlier turns + this one)."""

    question: str
    answer: str
    detection: Detection
    history: list[tuple[str, str]] = field(default_factory=list)


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
        self.weights: Path | None = None  # the weights folder, when loaded from one
        self.calibration: Calibration | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "small",
        device: str | torch.device | None = None,
        config: DetectorConfig | None = None,
        threshold_file: str | Path | None = None,
        **build_kwargs: Any,
    ) -> Detector:
        """Load ``"small"`` (packaged weights), a checkpoint folder (``save_trainable`` / training's
        ``final/``) or a training output folder (its ``final/``). ``device`` None = ``config.device``;
        ``threshold_file``: a ``vmad calibrate`` file for verdicts (:meth:`load_threshold_file`);
        ``build_kwargs`` go to ``build_vmad`` (e.g. ``llava_path``/``sam_path`` for a paper-preset
        checkpoint)."""
        config = (config or DetectorConfig()).validate()
        folder = resolve_model_path(model)
        dev = torch.device(device) if device is not None else config.torch_device()
        vmad = load_pretrained(folder, device=dev, **build_kwargs)
        if dev.type == "cuda":  # the GPU fast path (bf16, SDPA, static cache + compile); CPU unchanged
            from vmad.model.fastpath import enable_fast_path

            enable_fast_path(vmad.eval())
        detector = cls(vmad, config, name=str(model))
        detector.weights = folder
        if threshold_file is not None:
            detector.load_threshold_file(threshold_file)
        return detector

    @staticmethod
    def from_baseline(name: str = "musc", references: Sequence[ImageInput] | None = None,
                      threshold_file: str | Path | None = None, **options: Any) -> BaselineDetector:
        """A training-free method behind the same API (``detect`` -> :class:`Detection` with score, map,
        mask and verdict; ``calibrate``; ``load_threshold_file``): see :mod:`vmad.infer.baseline`.
        ``references``: normal images to score against (MuSc's reference mode); ``options``: the
        baseline's config fields (e.g. ``image_size=320``)."""
        from vmad.infer.baseline import build_baseline_detector

        return build_baseline_detector(name, references=references, threshold_file=threshold_file, **options)

    # ------------------------------------------------------------- thresholds
    def method_info(self) -> dict[str, Any]:
        """What a calibration of this detector is valid for: the weights (SHA-256 of model.safetensors,
        when loaded from a folder) and the image-score rule."""
        sha = None
        if self.weights is not None and (self.weights / WEIGHTS_NAME).is_file():
            sha = file_sha256(self.weights / WEIGHTS_NAME)
        return {"kind": "vmad", "model": self.name, "weights_sha256": sha,
                "score_rule": asdict(self.model.config.score)}

    def calibrate(
        self,
        normal_images: ImageInput | Sequence[ImageInput],
        class_name: str | None = None,
        fpr: float = DEFAULT_FPR,
        answer: bool = False,
        apply: bool = True,
        priors: Priors | None = None,
    ) -> Calibration:
        """Score a few normal images of the object (at least 2) and derive the verdict threshold by the rule
        of :mod:`vmad.infer.calibration`; ``apply`` sets it on this detector (image and mask thresholds).
        ``answer``: score in answer mode (as ``vmad detect`` does by default) instead of segmentation only;
        ``priors``: as :meth:`detect` (default: computed over the normal images)."""
        def rule(dets: list[Detection]) -> Calibration:
            exact = [d.score_logit for d in dets]
            return make_calibration(
                [d.anomaly_score for d in dets],
                self.method_info(),
                fpr,
                scale="logit",  # the image score is a probability
                log_odds=None if None in exact else exact,  # type: ignore[arg-type]
                images=[d.source or f"<array {i}>" for i, d in enumerate(dets)],
                class_name=class_name,
                answer_mode=answer,
            )

        cal = rule(self.detect(normal_images, answer=answer, class_name=class_name, priors=priors))
        if self.uses_priors:  # OURS: an image that gets no prior is scored on the decoder's own scale
            alone = Detector(self.model, replace(self.config, prior="off"))
            off = rule(alone.detect(normal_images, answer=answer, class_name=class_name))
            cal.without_prior = {"image_threshold": off.image_threshold, "mask_threshold": off.mask_threshold,
                                 "scores": off.scores, "stats": off.stats}
        if apply:
            self.apply_calibration(cal)
        return cal

    def apply_calibration(self, calibration: Calibration, where: str = "calibration") -> None:
        """Use ``calibration``'s thresholds from now on (VMADError when it was made for another method,
        other weights or another score rule)."""
        calibration.check_method(self.method_info(), where)
        mask = min(max(float(calibration.mask_threshold), 0.0), 1.0)
        alone = calibration.without_prior or {}
        alone_mask = alone.get("mask_threshold")
        self.config = replace(
            self.config, image_threshold=float(calibration.image_threshold), threshold=mask,
            image_threshold_without_prior=alone.get("image_threshold"),
            threshold_without_prior=None if alone_mask is None else min(max(float(alone_mask), 0.0), 1.0),
        ).validate()
        self.calibration = calibration

    def load_threshold_file(self, path: str | Path) -> Calibration:
        """Read a ``vmad calibrate`` threshold file and apply it (:meth:`apply_calibration`); for the CLI,
        the chat and the API alike. Returns it."""
        calibration = Calibration.load(path)
        self.apply_calibration(calibration, str(path))
        return calibration

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
    @property
    def uses_priors(self) -> bool:
        """The model takes a normality prior (``mask_decoder.prior_prompt``) and ``config.prior`` is on."""
        return bool(self.model.config.mask_decoder.prior_prompt) and self.config.prior != "off"

    def normality_priors(
        self, images: Sequence[ImageInput], references: Sequence[ImageInput] = ()
    ) -> Priors | None:
        """OURS: the priors of ``images`` by mutual scoring among them and ``references``
        (:func:`vmad.baselines.prior.compute_priors`), or None when :attr:`uses_priors` is False."""
        if not self.uses_priors:
            return None
        from vmad.baselines.musc import MuScScorer
        from vmad.baselines.prior import PriorConfig, compute_priors, join_priors

        def arrays(items: Sequence[ImageInput]) -> list[np.ndarray]:
            limit = self.config.max_pixels
            tensors = [x if isinstance(x, torch.Tensor) else _load(x, limit)[0] for x in items]
            return [(t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for t in tensors]

        images, refs = arrays(images), arrays(references)
        config = PriorConfig(self_prior=self.config.prior in ("folder+self", "self"))
        if self.config.prior == "self" and len(images) > 1:  # one backbone for every image's own prior
            scorer = MuScScorer(config.musc)
            return join_priors([compute_priors([im], refs, config=config, scorer=scorer) for im in images])
        return compute_priors(images, refs, config=config)

    def detect(
        self,
        images: ImageInput | Sequence[ImageInput],
        question: str | None = None,
        answer: bool = False,
        class_name: str | None = None,
        *,
        max_new_tokens: int | None = None,
        original_sizes: Sequence[tuple[int, int] | None] | None = None,
        priors: Priors | None = None,
    ) -> list[Detection]:
        """Detect anomalies in one image or a list (paths, (H, W[, 3]) uint8 arrays, PIL images, [3, H, W]
        tensors in [0, 1]; pixel values are checked as :func:`_as_tensor` says: NaN / inf, out-of-range floats
        and integers outside 0-255 raise VMADError). ``question`` None = :meth:`default_question`; an empty
        question is a VMADError. ``answer`` False = segmentation only (one forward); True = generated answer
        + mask (see the module rules). One Detection per image, in order; ``Detection.question`` is the
        question asked. Images above ``config.max_pixels`` are reduced first (module rules on large
        images). ``original_sizes`` (one (H, W) or None per image) is for callers that reduced an image
        themselves (e.g. :func:`vmad.data.io.read_image_bounded`): the mask is returned at that size.
        ``priors`` (OURS, prior_prompt models): one per image, e.g. from :meth:`normality_priors` over a
        whole folder; None = computed over these images (``config.prior``)."""
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
        if priors is None:
            priors = self.normality_priors([t for t, _, _ in loaded])
        elif len(priors.maps) != len(loaded):
            raise VMADError(f"priors has {len(priors.maps)} maps for {len(loaded)} images")
        evidence = answer and self._evidence_verdict(q, class_name)
        return self._run_batches(loaded, priors, answer, q, fallback_q, tokens, evidence)


    def _run_batches(
        self, loaded: list[tuple[torch.Tensor, str | None, tuple[int, int]]], priors: Priors | None,
        answer: bool, q: str, fallback_q: str, tokens: int, evidence: bool = False,
    ) -> list[Detection]:
        """``config.batch_size`` images at a time; same-size images of a batch share one forward."""
        out: list[Detection | None] = [None] * len(loaded)
        bs = self.config.batch_size
        for start in range(0, len(loaded), bs):
            groups: dict[tuple[int, int], list[int]] = {}
            for i in range(start, min(start + bs, len(loaded))):
                groups.setdefault(tuple(loaded[i][0].shape[-2:]), []).append(i)
            for same_size in groups.values():
                for idx, thresholds in self._threshold_groups(same_size, priors):
                    batch = torch.stack([loaded[i][0] for i in idx])
                    sizes = [loaded[i][2] for i in idx]
                    # sizes only for reduced images: full-size ones take exactly the former path
                    extra: dict[str, Any] = (
                        {} if all(s == tuple(batch.shape[-2:]) for s in sizes) else {"sizes": sizes}
                    )
                    if priors is not None and priors.mode != "none":
                        extra["priors"] = priors.tensor(idx)
                    results = (
                        self._answer(batch, q, fallback_q, tokens, thresholds, evidence=evidence, **extra)
                        if answer else self._segment(batch, q, thresholds, **extra)
                    )
                    self._place(out, idx, results, loaded, priors)
        return out  # type: ignore[return-value]

    def _threshold_groups(
        self, idx: list[int], priors: Priors | None
    ) -> list[tuple[list[int], tuple[float, float | None]]]:
        """``idx`` split into the images with a prior and those without, each with its (mask, image)
        thresholds: without a prior the ``*_without_prior`` ones where set (OURS; a calibration of a prior
        model sets them), else the same."""
        cfg = self.config
        main = (cfg.threshold, cfg.image_threshold)
        if cfg.threshold_without_prior is None and cfg.image_threshold_without_prior is None:
            return [(idx, main)]
        alone = (cfg.threshold if cfg.threshold_without_prior is None else cfg.threshold_without_prior,
                 cfg.image_threshold if cfg.image_threshold_without_prior is None
                 else cfg.image_threshold_without_prior)
        has = [priors is not None and priors.maps[i] is not None for i in idx]
        parts = [([i for i, h in zip(idx, has, strict=True) if h], main),
                 ([i for i, h in zip(idx, has, strict=True) if not h], alone)]
        return [(part, t) for part, t in parts if part]

    @staticmethod
    def _place(
        out: list[Detection | None], idx: list[int], results: list[Detection],
        loaded: list[tuple[torch.Tensor, str | None, tuple[int, int]]], priors: Priors | None,
    ) -> None:
        """Put a group's detections at their images' places, with their source and prior mode."""
        for i, det in zip(idx, results, strict=True):
            det.source = loaded[i][1]
            if priors is not None:
                det.prior = priors.mode_of(i)
            out[i] = det

    @property
    def refines(self) -> bool:
        """The binary masks come from the mask refiner (OURS): the model has one and ``config.refine``."""
        return self.model.mask_refiner is not None and self.config.refine

    def _refined_cut(self, image: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor | None,
                     mask_threshold: float) -> torch.Tensor:
        """One image's refined mask logits relative to the mask threshold (mask = result > 0): the
        decoder's logits (None: the log-odds of ``probs``) are shifted so that the threshold sits at 0, the
        refiner's own decision point (it was trained at probability 0.5), then refined."""
        if logits is None:
            logits = torch.logit(probs.detach().float().clamp(1e-7, 1 - 1e-7))
        t = min(max(float(mask_threshold), 1e-12), 1 - 1e-12)
        shift = math.log(t / (1 - t))
        return self.model.refined_mask_logits(image[None], logits[None].float() - shift)[0]

    def _detection(
        self, probs: torch.Tensor, score: float, question: str, size: tuple[int, int] | None = None,
        thresholds: tuple[float, float | None] | None = None, image: torch.Tensor | None = None,
        logits: torch.Tensor | None = None, **kw: Any
    ) -> Detection:
        """``thresholds``: (mask, image) thresholds; None = the config's. ``image`` (and the map's
        ``logits`` when known): the mask refiner's input, for a detector that :attr:`refines`."""
        p = probs.detach().float().cpu().numpy().astype(np.float32, copy=False)
        mask_t, image_t = thresholds or (self.config.threshold, self.config.image_threshold)
        refined = None
        if image is not None and self.refines:
            cut = self._refined_cut(image, probs, logits, mask_t)
            refined = cut.cpu().numpy().astype(np.float32, copy=False)
        return make_detection(p, score, question, size, mask_t, image_t, mask_logits=refined, **kw)

    def _segment(
        self, images: torch.Tensor, question: str, thresholds: tuple[float, float | None] | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None, priors: torch.Tensor | None = None,
    ) -> list[Detection]:
        sizes = sizes or [None] * len(images)
        extra = {} if priors is None else {"priors": priors}
        res = self.model.segment(images, question, **extra)
        if self.model.config.score.space != "logit":
            return [self._detection(res.probs[i], float(res.scores[i]), question, sizes[i], thresholds,
                                    image=images[i], logits=res.logits[i]) for i in range(len(images))]
        logits = res.logits.detach().float().cpu().numpy()
        return [self._detection(res.probs[i], float(res.scores[i]), question, sizes[i], thresholds,
                                image=images[i], logits=res.logits[i],
                                logit_map=logits[i], score_logit=float(res.score_logits[i]))  # type: ignore[index]
                for i in range(len(images))]

    def _answer(
        self, images: torch.Tensor, question: str, fallback: str, tokens: int,
        thresholds: tuple[float, float | None] | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None, priors: torch.Tensor | None = None,
        evidence: bool = False,
    ) -> list[Detection]:
        """Answer mode; ``evidence``: the verdict comes from the segmentation-only pass first
        (:meth:`_evidence_openings`)."""
        sizes = sizes or [None] * len(images)
        extra: dict[str, Any] = {} if priors is None else {"priors": priors}
        seg: dict[int, tuple[torch.Tensor, float]] = {}  # image -> mask and score without <seg> in the answer
        if evidence:  # the verdict first, from the segmentation-only pass
            encoded = self.model.encode_images(images, priors)
            first = self.model.segment(images, fallback, encoded=encoded)
            seg = {i: (first.probs[i], float(first.scores[i])) for i in range(len(images))}
            extra = {**self._evidence_openings(first, thresholds, images), "encoded": encoded}
        gen = self.model.generate(images, question, max_new_tokens=tokens, **extra)
        missing = [i for i, p in enumerate(gen.probs) if p is None and i not in seg]
        if missing:  # the fallback reuses the encoded images: no frozen encoder runs twice
            rows = torch.tensor(missing, dtype=torch.long)
            reuse: dict[str, Any] = {} if gen.encoded is None else {"encoded": gen.encoded.rows(rows)}
            if gen.encoded is None and priors is not None:
                reuse["priors"] = priors[rows]
            part = self.model.segment(images[missing], fallback, **reuse)
            seg.update({i: (part.probs[j], float(part.scores[j])) for j, i in enumerate(missing)})
        out = []
        for i in range(len(images)):
            if gen.probs[i] is not None:
                det = self._detection(gen.probs[i], float(gen.scores[i]), question, sizes[i], thresholds,
                                      image=images[i], mask_from="answer")
            else:
                det = self._detection(*seg[i], question, sizes[i], thresholds, image=images[i])
            det.answer = gen.texts[i]
            out.append(det)
        return out

    def _evidence_verdict(self, question: str, class_name: str | None) -> bool:
        """``answer_verdict="evidence"`` applies to the default segmentation + answer question only (its
        answers open with the segmentation answer); other questions and chat follow-ups are the LLM's."""
        return (self.config.answer_verdict == "evidence"
                and question == self.default_question(class_name, answer=True))

    def _evidence_openings(
        self, seg: SegmentationResult, thresholds: tuple[float, float | None] | None = None,
        images: torch.Tensor | None = None,
    ) -> dict[str, list[str | None]]:
        """``answer_verdict="evidence"``: per image, the segmentation-only verdict (``score >
        image_threshold`` when set, else a non-empty binary mask) as generation constraints: a normal image's
        answer opens with the segmentation answer then "No defect was found", an anomalous image's opens with
        the segmentation answer and its free part must not open with "No"."""
        mask_t, image_t = thresholds or (self.config.threshold, self.config.image_threshold)
        if image_t is not None:
            anomalous = (seg.scores > image_t).tolist()
        else:
            if images is not None and self.refines:  # the binary mask the user gets
                cut = torch.stack([self._refined_cut(images[i], seg.probs[i], seg.logits[i], mask_t)
                                   for i in range(len(images))])
                anomalous = (cut.flatten(1) > 0).any(1).tolist()
            else:
                anomalous = (seg.probs.flatten(1) > mask_t).any(1).tolist()
        opening = self.model.config.llm.seg_answer
        return {
            "prefixes": [opening if a else f"{opening} {NORMAL_OPENING}" for a in anomalous],
            "avoid": [f" {NORMAL_OPENING}" if a else None for a in anomalous],
        }

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
        evidence = not history and self._evidence_verdict(question, class_name)
        [(_, alone)] = self._threshold_groups([0], None)  # one image, no prior
        [det] = self._answer(tensor[None], folded, self.default_question(class_name), tokens, alone,
                             sizes=[size], evidence=evidence)
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

    @property
    def images_per_call(self) -> int | None:
        """Images are scored independently: the engine hands them over a batch at a time (and decodes the
        next batch meanwhile); a model that uses normality priors (OURS) needs the whole class at once."""
        return None if self._uses_priors() else self.config.batch_size

    @property
    def takes_prior(self) -> bool:
        """The model has the normality-prior input (``mask_decoder.prior_prompt``), whatever
        ``config.prior`` says."""
        return self._decoder_flag("prior_prompt")

    @property
    def has_refiner(self) -> bool:
        """The model has a mask refiner (``mask_decoder.refiner``), whatever ``config.refine`` says."""
        return self._decoder_flag("refiner")

    def _decoder_flag(self, name: str) -> bool:
        if self.detector is not None:
            return bool(getattr(self.detector.model.config.mask_decoder, name))
        if self.path is None:
            return False
        meta = json.loads((self.path / CONFIG_NAME).read_text(encoding="utf-8"))
        return bool(meta.get("config", {}).get("mask_decoder", {}).get(name, False))

    def _uses_priors(self) -> bool:
        return self.config.prior != "off" and self.takes_prior

    def prepare(self) -> None:
        if self.detector is None:
            self.detector = Detector.from_pretrained(self.path or self.model_ref, config=self.config)

    def score(self, images: Sequence[np.ndarray], class_name: str) -> ScoreOutput:
        from vmad.baselines.musc import interleaved_groups

        self.prepare()
        size = self.config.prior_group_size if self._uses_priors() else 0
        dets: list[Detection] = [None] * len(images)  # type: ignore[list-item]
        for group in interleaved_groups(len(images), size):  # priors within each group
            found = self.detector.detect([images[i] for i in group], class_name=class_name)  # type: ignore[union-attr]
            for i, det in zip(group, found, strict=True):
                dets[i] = det
        if all(d.logit_map is not None and d.score_logit is not None for d in dets):  # score space "logit"
            return ScoreOutput(image_scores=np.array([d.score_logit for d in dets], dtype=np.float64),
                               anomaly_maps=[d.full_logit_map() for d in dets])  # type: ignore[misc]
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
            "anomaly_map": "mask logits (M_decoder) at the input image size; image score = its log-odds"
            if score.get("space") == "logit"
            else "mask probability (sigmoid of M_decoder logits) at the input image size",
            **{k: v for k, v in asdict(self.config).items() if k in ("batch_size", "device")},
            # OURS: how the normality priors were used (only for a model that takes them)
            **({"prior": self.config.prior, "prior_group_size": self.config.prior_group_size}
               if self.takes_prior else {}),
            **({"refine": self.config.refine} if self.has_refiner else {}),  # OURS: the mask refiner's use
        }


def build_scorer(name_or_path: str | Path = "small", **options: Any) -> VMADScorer:
    """The ``vmad eval --model NAME_OR_PATH`` scorer; ``options`` are :class:`DetectorConfig` fields (strings
    are converted). The weights folder is checked now; the model is loaded by ``prepare()``."""
    return VMADScorer(name_or_path, from_mapping(DetectorConfig, options, "detector"))

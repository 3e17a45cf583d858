"""Verdict thresholds from a few normal images (``vmad calibrate``, ``Detector.calibrate``) and the threshold
file that ``vmad detect --threshold-file``, ``Detector.load_threshold_file`` and the chat read.

Rule (OURS, fixed before any result on the evaluation data): with the anomaly scores s_1..s_n of n >= 2
normal images of the object (mean m, sample standard deviation sd), the image threshold is the one-sided
upper prediction bound for the score of one more normal image at level 1 - fpr, assuming normal scores are
Gaussian::

    t = max(m + q * sd * sqrt(1 + 1/n), max_i s_i),    q = Student-t quantile(1 - fpr, n - 1 dof)

(default fpr 0.05: about 5 % of normal images above it when the assumption holds; with 5 images
q * sqrt(1.2) = 2.34). An image is ``"anomalous"`` when its score is ``> t``. No calibration image is ever
above its own threshold. A score that is a probability (VMAD's, ``scale="logit"``) is bounded, so the bound is
taken on its log-odds: m, sd and the bound of logit(s_i), then t = sigmoid(bound) (clipped to
[1e-12, 1 - 1e-12] first; a model scoring in log-odds, ``model.score.space: logit``, gives its exact
log-odds instead, which do not round to 1); on the raw probabilities a wide spread of the normal scores put t
above 1, so that every image was called normal (the rule before 2026-12-03, still ``scale="linear"``,
MuSc's). The mask threshold is set to the same value (clipped to [0, 1] for probability maps): the image
score is the maximum of the map (MuSc: exactly, so a normal verdict has an empty mask; VMAD: of the
Gaussian-smoothed map, while the mask thresholds the raw one, so the two agree only roughly).

The file (JSON, ``format: vmad-calibration``) records the threshold, the rule, the scores it came from and
the method it is valid for (VMAD: the weights' SHA-256 and the score rule; MuSc: the settings that change
its scores, and the reference images, which MuSc's reference mode scores against: their paths, resolved).
Loading it into a detector of another method or other weights is a VMADError. For a model with a normality
prior (OURS) it also holds ``without_prior``: the thresholds of the same images scored without a prior, which
:class:`vmad.infer.detector.Detector` uses for an image that gets none.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmad.errors import VMADError

CALIBRATION_FORMAT = "vmad-calibration"
CALIBRATION_VERSION = 1
DEFAULT_FPR = 0.05
RULE_TEXT = (
    "t = max(mean + q * sd * sqrt(1 + 1/n), max score), q = Student-t quantile(1 - fpr, n - 1): one-sided "
    "upper prediction bound for one more normal score (Gaussian assumption; for probabilities on their "
    "log-odds); anomalous when score > t"
)
Scale = Literal["linear", "logit"]
LOGIT_EPS = 1e-12


@dataclass
class Calibration:
    """A verdict threshold and where it came from (see the module docstring)."""

    image_threshold: float
    mask_threshold: float
    method: dict[str, Any]
    scores: list[float]
    fpr: float = DEFAULT_FPR
    rule: str = RULE_TEXT
    stats: dict[str, float] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    class_name: str | None = None
    answer_mode: bool = False
    created: str = ""
    scale: Scale = "linear"
    #: OURS, a model with a normality prior: the same normal images scored without one (``image_threshold``,
    #: ``mask_threshold``, ``scores``, ``stats``), the thresholds for an image that gets no prior (a single
    #: image): its scores are on the decoder's own scale, not the prior-fused one.
    without_prior: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the threshold file (atomically); VMADError when it cannot be written."""
        from vmad.atomic import write_json_atomic

        path = Path(path)
        if path.is_dir():
            raise VMADError(f"{path}: is a folder; give a file name for the threshold file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, self.to_dict(), indent=2, allow_nan=False)
        except OSError as exc:
            raise VMADError(f"{path}: cannot write the threshold file ({exc.strerror or exc})") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a threshold file; VMADError naming the file and the problem when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VMADError(f"{path}: no such threshold file (write one with `vmad calibrate`)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise VMADError(f"{path}: not a readable JSON threshold file ({exc})") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = "threshold file") -> Calibration:
        if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
            raise VMADError(f"{where}: not a {CALIBRATION_FORMAT} file (write one with `vmad calibrate`)")
        if data.get("version", 1) > CALIBRATION_VERSION:
            raise VMADError(f"{where}: written by a newer vmad (version {data.get('version')})")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        try:
            cal = cls(**values)
        except TypeError as exc:
            raise VMADError(f"{where}: incomplete threshold file ({exc})") from None
        checked = [(name, getattr(cal, name)) for name in ("image_threshold", "mask_threshold")]
        if cal.without_prior is not None:
            if not isinstance(cal.without_prior, Mapping):
                raise VMADError(f"{where}: without_prior must be a mapping, got {cal.without_prior!r}")
            checked += [(f"without_prior.{name}", cal.without_prior.get(name))
                        for name in ("image_threshold", "mask_threshold")]
        for name, value in checked:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise VMADError(f"{where}: {name} must be a finite number, got {value!r}")
        if not isinstance(cal.method, Mapping) or "kind" not in cal.method:
            raise VMADError(f"{where}: no 'method' with a 'kind'")
        return cal

    def check_method(self, method: Mapping[str, Any], where: str = "threshold file") -> None:
        """VMADError when this calibration was made for another method than ``method`` (a detector's
        :meth:`method_info`): another kind, other weights, another score rule or other settings."""
        mine = self.method
        if mine.get("kind") != method.get("kind"):
            raise VMADError(
                f"{where}: calibrated for {describe_method(mine)}, not for {describe_method(method)}"
            )
        for key in ("weights_sha256", "score_rule", "settings"):
            a, b = mine.get(key), method.get(key)
            if a is not None and b is not None and a != b:
                raise VMADError(
                    f"{where}: calibrated for {describe_method(mine)} with another {key.replace('_', ' ')} "
                    f"than this {describe_method(method)}; calibrate again for this one"
                )


def describe_method(method: Mapping[str, Any]) -> str:
    """``"VMAD model 'small'"`` / ``"baseline 'musc'"``."""
    if method.get("kind") == "vmad":
        return f"VMAD model {method.get('model')!r}"
    return f"baseline {method.get('kind')!r}"


def _logit(p: float) -> float:
    p = min(max(p, LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(p) - math.log1p(-p)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def threshold_from_normals(
    scores: Sequence[float], fpr: float = DEFAULT_FPR, scale: Scale = "linear",
    log_odds: Sequence[float] | None = None,
) -> tuple[float, dict[str, float]]:
    """``(threshold, stats)`` by the module rule; ``scale="logit"`` for probabilities (the bound on their
    log-odds; stats in log-odds too). ``log_odds``: the scores' exact log-odds where the model keeps them
    (``Detection.score_logit``, OURS), used instead of the clamped logit of probabilities that may round to 1.
    VMADError for fewer than 2 scores, a bad ``fpr``, or a probability outside [0, 1]."""
    if scale not in ("linear", "logit"):
        raise VMADError(f"scale must be 'linear' or 'logit', got {scale!r}")
    if scale == "logit":
        bad = [s for s in scores if not 0.0 <= float(s) <= 1.0]
        if bad:
            raise VMADError(f"calibration scores on the logit scale must be probabilities in [0, 1], "
                            f"got {bad[0]}")
        if log_odds is not None and len(log_odds) != len(scores):
            raise VMADError(f"got {len(log_odds)} log-odds for {len(scores)} calibration scores")
        z = [float(v) for v in log_odds] if log_odds is not None else [_logit(float(s)) for s in scores]
        threshold, info = threshold_from_normals(z, fpr)
        top = max(float(s) for s in scores)
        return max(_sigmoid(threshold), top), {**info, "max_probability": top}
    from scipy import stats

    values = [float(s) for s in scores]
    n = len(values)
    if n < 2:
        raise VMADError(f"calibration needs at least 2 normal images, got {n}")
    if not 0.0 < fpr < 0.5:
        raise VMADError(f"fpr must be in (0, 0.5), got {fpr}")
    if not all(math.isfinite(v) for v in values):
        raise VMADError("calibration scores contain NaN or inf")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    q = float(stats.t.ppf(1.0 - fpr, n - 1))
    bound = mean + q * sd * math.sqrt(1.0 + 1.0 / n)
    threshold = max(bound, max(values))
    info = {"n": n, "mean": mean, "std": sd, "min": min(values), "max": max(values), "t_quantile": q,
            "prediction_bound": bound}
    return threshold, info


def make_calibration(
    scores: Sequence[float],
    method: dict[str, Any],
    fpr: float = DEFAULT_FPR,
    mask_range: tuple[float, float] | None = (0.0, 1.0),
    scale: Scale = "linear",
    log_odds: Sequence[float] | None = None,
    **extra: Any,
) -> Calibration:
    """A :class:`Calibration` by the module rule on ``scale`` (``log_odds``: see
    :func:`threshold_from_normals`); the mask threshold is the image threshold, clipped to ``mask_range``
    (None: not clipped)."""
    threshold, info = threshold_from_normals(scores, fpr, scale, log_odds)
    mask = threshold if mask_range is None else min(max(threshold, mask_range[0]), mask_range[1])
    return Calibration(
        image_threshold=threshold,
        mask_threshold=mask,
        method=method,
        scores=[float(s) for s in scores],
        fpr=fpr,
        stats=info,
        scale=scale,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

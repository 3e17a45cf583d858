"""One record per image, whatever the on-disk layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Split = Literal["train", "val", "test"]
NORMAL, ANOMALOUS = 0, 1


@dataclass(frozen=True)
class Sample:
    """An image with its class, label and (for anomalous images) ground-truth mask.

    ``label`` is 0 (normal) or 1 (anomalous). ``defect_type`` is ``"good"`` for normal images.
    ``mask_path`` is None for normal images without a mask file. ``mask_spec`` tells the loader how to
    turn the mask file into a binary mask (e.g. ``"png"``: threshold a grey-level PNG, ``"png-nonzero"``,
    ``"coco:<image id>"``: rasterise the COCO annotations of that image). ``answers`` holds the text
    answers of RIAD-format data (keys ``description``, ``impact``, ``suggestion``).
    """

    image_path: Path
    class_name: str
    label: int
    defect_type: str
    split: str
    mask_path: Path | None = None
    mask_spec: str = "png"
    answers: dict[str, str] | None = field(default=None, compare=False, hash=False)
    normal_description: str | None = field(default=None, compare=False, hash=False)

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS

"""Regenerate the example images of ``examples/`` (used by ``make demo``) and their ground-truth masks.

Sources: real photographs shipped in the scikit-image wheel (``skimage/data/*.png``; licences in
examples/README.md). Each example is a crop / resize of one photograph; most get one synthetic defect painted
by :func:`vmad.data.synth.synthesize` (exact mask = the changed pixels), two stay defect-free for contrast.

Output (the ``folder`` dataset layout, so ``vmad data inspect examples`` and ``vmad eval --data examples``
read it): ``images/<name>.png|.jpg`` and ``masks/<name>.png`` (0/255, blank for defect-free examples).

Deterministic: fixed crops, seeds and encoders; the source files are checked against their SHA-256, so a
different scikit-image release with other pixels is refused instead of silently giving other examples.

Needs scikit-image installed (only to read its data files; it is not a vmad dependency):

    .venv/bin/pip install scikit-image==0.26.0
    .venv/bin/python examples/make_examples.py            # writes examples/images and examples/masks
    .venv/bin/python examples/make_examples.py --check    # regenerate in memory, compare with the files
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vmad.data.synth import SynthConfig, synthesize

HERE = Path(__file__).resolve().parent
MAX_BYTES = 120_000
MAX_SIDE = 512


@dataclass(frozen=True)
class Example:
    """One example: ``source`` file in skimage/data (its SHA-256), crop box (left, upper, right, lower) in
    source pixels, output size (width, height), synthetic defect ``kind`` (None = defect-free) and its RNG
    seed, and the output format."""

    name: str
    source: str
    sha256: str
    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    kind: str | None
    seed: int = 0
    suffix: str = ".png"


BRICK = "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"
EXAMPLES: tuple[Example, ...] = (
    Example("brick_crack", "brick.png", BRICK, (0, 0, 256, 256), (256, 256), "crack", seed=2),
    Example("brick_good", "brick.png", BRICK, (256, 256, 512, 512), (256, 256), None),
    Example(
        "gravel_contamination",
        "gravel.png",
        "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
        (0, 0, 256, 256),
        (256, 256),
        "contamination",
        seed=2,
    ),
    Example(
        "coins_scratch",
        "coins.png",
        "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
        (0, 0, 384, 303),
        (384, 303),
        "scratch",
        seed=7,
    ),
    Example(
        "grass_spot",
        "grass.png",
        "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
        (0, 0, 256, 256),
        (256, 256),
        "spot",
        seed=4,
    ),
    Example(
        "coffee_good",
        "coffee.png",
        "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        (0, 0, 600, 400),
        (384, 256),
        None,
        suffix=".jpg",
    ),
)


def skimage_data_dir() -> Path:
    """``skimage/data`` of the installed scikit-image, found without importing it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-image is not installed: .venv/bin/pip install scikit-image==0.26.0")
    return Path(spec.origin).parent / "data"


def load_source(ex: Example, data_dir: Path) -> np.ndarray:
    """The cropped, resized source photograph as (H, W, 3) uint8 (grey sources: three equal channels)."""
    raw = (data_dir / ex.source).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ex.sha256:
        version = importlib.metadata.version("scikit-image")
        raise SystemExit(
            f"{data_dir / ex.source}: SHA-256 {digest} differs from the expected {ex.sha256} "
            f"(scikit-image {version}; the examples were made from scikit-image 0.26.0)"
        )
    image = Image.open(io.BytesIO(raw))
    image = image.crop(ex.crop)
    if image.size != ex.size:
        image = image.resize(ex.size, Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"))


def encode(image: np.ndarray, suffix: str) -> bytes:
    grey = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    pil = Image.fromarray(image[..., 0] if grey else image)
    buf = io.BytesIO()
    if suffix == ".jpg":
        pil.save(buf, format="JPEG", quality=90)
    else:
        pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make(ex: Example, data_dir: Path) -> tuple[bytes, bytes, dict]:
    """(image file bytes, mask PNG bytes, facts for the README) of one example."""
    image = load_source(ex, data_dir)
    mask = np.zeros(image.shape[:2], dtype=bool)
    if ex.kind is not None:
        defect = synthesize(image, np.random.default_rng(ex.seed), ex.kind, SynthConfig())
        image, mask = defect.image, defect.mask
    mask_png = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_png, format="PNG", optimize=True)
    data = encode(image, ex.suffix)
    if len(data) > MAX_BYTES or max(ex.size) > MAX_SIDE:
        raise SystemExit(f"{ex.name}: {len(data)} bytes, {ex.size} px: over the example size limits")
    facts = {"bytes": len(data), "mask_pixels": int(mask.sum()), "fraction": float(mask.mean())}
    return data, mask_png.getvalue(), facts


def main() -> int:
    parser = argparse.ArgumentParser(description="Regenerate examples/ (images and ground-truth masks).")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: examples/)")
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = parser.parse_args()
    data_dir = skimage_data_dir()
    different = []
    for ex in EXAMPLES:
        data, mask, facts = make(ex, data_dir)
        files = {
            args.out / "images" / f"{ex.name}{ex.suffix}": data,
            args.out / "masks" / f"{ex.name}.png": mask,
        }
        for path, content in files.items():
            if args.check:
                if not path.is_file() or path.read_bytes() != content:
                    different.append(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        defect = ex.kind or "none"
        print(
            f"{ex.name}{ex.suffix}: {ex.size[0]}x{ex.size[1]}, {facts['bytes']} bytes, defect {defect}, "
            f"mask {facts['mask_pixels']} px ({100 * facts['fraction']:.2f} %)"
        )
    if different:
        print("differ from a fresh build: " + ", ".join(map(str, different)), file=sys.stderr)
        return 1
    print("all files identical to a fresh build" if args.check else f"wrote {len(EXAMPLES)} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

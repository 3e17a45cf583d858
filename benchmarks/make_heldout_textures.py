"""Build a held-out validation set of unseen surfaces: the data the normality-prior weights are chosen on.

VMAD-small's decoder was trained on the objects of the in-domain test splits (Magnetic-tile, MPDD metal_plate,
NEU-Seg train splits) and on procedural images, so a choice made on those splits rewards the decoder. This set
holds surfaces it never saw: crops of four photographs shipped in the scikit-image wheel that are neither in
the training data nor in `examples/` (the `make demo` images come from other files): an IHC tissue stain, the
Moon's surface, the Hubble deep field and a cell microscopy image. Per class: ``--per-class`` random square
crops (random position, size 40-60 % of the shorter side, random flip and quarter turn), resized to 256 x 256;
every second crop gets one synthetic defect painted by `vmad.data.synth.synthesize` (the six kinds in turn,
exact mask = changed pixels). MVTec AD is not used.

Output in the `folder` dataset layout (`vmad data inspect`, `vmad eval --data` and `load_dataset` read it):
``OUT/<class>/images/NNN.png`` and ``OUT/<class>/masks/NNN.png`` (blank for normal crops). Deterministic for
a seed; the source files are checked against their SHA-256 (scikit-image 0.26.0).

    .venv/bin/pip download --no-deps scikit-image==0.26.0 -d /tmp/skw && unzip -q /tmp/skw/*.whl \
        'skimage/data/*' -d /tmp/skw
    python benchmarks/make_heldout_textures.py --skimage-data /tmp/skw/skimage/data --out /tmp/heldout

(or, with scikit-image installed, without ``--skimage-data``). Nothing of it goes into the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vmad.data.synth import SYNTHETIC_KINDS, SynthConfig, synthesize

SOURCES = {  # class -> (file in skimage/data, SHA-256 in scikit-image 0.26.0)
    "ihc": ("ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    "moon": ("moon.png", "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577"),
    "hubble": ("hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    "cell": ("cell.png", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515"),
}
SIDE = 256


def skimage_data_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-image is not installed: give --skimage-data DIR (see the docstring)")
    return Path(spec.origin).parent / "data"


def load_source(data_dir: Path, name: str, sha256: str) -> np.ndarray:
    path = data_dir / name
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise SystemExit(f"{path}: not the file of scikit-image 0.26.0 (SHA-256 differs)")
    return np.asarray(Image.open(path).convert("RGB"))


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (40-60 % of the shorter side), flipped / turned at random, at SIDE x SIDE."""
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 0.6))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = image[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.asarray(resized)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skimage-data", type=Path, help="skimage/data folder (default: the installed one)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (folder dataset layout)")
    parser.add_argument("--per-class", type=int, default=30, help="crops per class (half get a defect)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = skimage_data_dir(args.skimage_data)
    kinds = SynthConfig().kinds
    for c, (cls, (name, sha)) in enumerate(SOURCES.items()):
        source = load_source(data_dir, name, sha)
        rng = np.random.default_rng([args.seed, c])
        (args.out / cls / "images").mkdir(parents=True, exist_ok=True)
        (args.out / cls / "masks").mkdir(parents=True, exist_ok=True)
        n_defects = 0
        for i in range(args.per_class):
            image = random_crop(source, rng)
            mask = np.zeros(image.shape[:2], dtype=bool)
            if i % 2 == 1:
                defect = synthesize(image, rng, kinds[n_defects % len(kinds)], SynthConfig())
                image, mask, n_defects = defect.image, defect.mask, n_defects + 1
            Image.fromarray(image).save(args.out / cls / "images" / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / cls / "masks" / f"{i:03d}.png")
        print(f"{cls}: {args.per_class} crops of {name}, {n_defects} with a defect "
              f"({', '.join(SYNTHETIC_KINDS)})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

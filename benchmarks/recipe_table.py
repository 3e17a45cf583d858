"""Markdown table comparing VMAD-small training recipes from compare_small_musc.py output folders.

For each recipe: zero-shot MVTec AD bottle (image AUROC, pixel AUROC, AUPRO), the in-domain held-out test
splits (pixel AUROC, AUPRO) and the *selection score*, the mean of those six in-domain figures. The shipped
recipe is chosen on the selection score only (bottle is reported, never used to choose).

    python benchmarks/recipe_table.py NAME=OUT_DIR [NAME=OUT_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BOTTLE = "mvtec_ad_bottle"
IN_DOMAIN = ("mpdd_metal_plate", "magnetic_tile", "neu_seg")


def _mean(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / "VMAD-small" / name / "results.json").read_text())["mean"]


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def selection_score(out_dir: Path) -> float:
    """Mean of pixel AUROC and AUPRO over the in-domain test splits (percent)."""
    vals = [_mean(out_dir, s)[k] for s in IN_DOMAIN for k in ("pixel_auroc", "aupro")]
    return 100 * sum(vals) / len(vals)


def main(pairs: list[str]) -> int:
    head = ["recipe", "bottle Img AUROC", "bottle Pixel AUROC", "bottle AUPRO"]
    head += [f"{s} {k}" for s in IN_DOMAIN for k in ("Pixel AUROC", "AUPRO")] + ["in-domain mean"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for pair in pairs:
        name, _, folder = pair.partition("=")
        out = Path(folder)
        bottle = _mean(out, BOTTLE)
        cells = [name] + [pct(bottle[k]) for k in ("image_auroc", "pixel_auroc", "aupro")]
        cells += [pct(_mean(out, s)[k]) for s in IN_DOMAIN for k in ("pixel_auroc", "aupro")]
        cells.append(f"{selection_score(out):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[1:]):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))

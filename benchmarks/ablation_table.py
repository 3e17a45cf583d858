"""Markdown tables of benchmarks/ablation_small.sh's runs (Table III analogue): per variant, the zero-shot
MVTec AD bottle metrics with the last training losses, and the in-domain test-split metrics with their mean
(pixel AUROC and AUPRO over the three sets, the selection score of benchmarks/recipe_table.py).

    python benchmarks/ablation_table.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VARIANTS = (("both", "yes", "yes"), ("no_dssl", "yes", "no"), ("no_ltc", "no (avg-pool)", "yes"),
            ("neither", "no (avg-pool)", "no"))
METRICS = (("image_auroc", "Img AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "AUPRO"),
           ("image_ap", "Img AP"), ("pixel_ap", "Pixel AP"))
IN_DOMAIN = (("eval_mpdd_metal_plate", "MPDD"), ("eval_magnetic_tile", "Magnetic-tile"),
             ("eval_neu_seg", "NEU-Seg"))


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _mean(res_file: Path) -> dict[str, float] | None:
    return json.loads(res_file.read_text())["mean"] if res_file.is_file() else None


def bottle_table(out: Path) -> list[str]:
    head = ["variant", "LTC", "DSSL"] + [h for _, h in METRICS] + ["last loss_dice", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for name, ltc, dssl in VARIANTS:
        mean = _mean(out / name / "eval_bottle" / "results.json")
        if mean is None:
            lines.append("| " + " | ".join([name, ltc, dssl] + ["not run"] * (len(head) - 3)) + " |")
            continue
        log = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
        dice = [r["loss_dice"] for r in log if r.get("loss_dice") is not None]
        cells = [name, ltc, dssl] + [pct(mean.get(k)) for k, _ in METRICS]
        cells += [f"{sum(dice[-3:]) / len(dice[-3:]):.3f}" if dice else "–", str(log[-1]["step"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def in_domain_table(out: Path) -> list[str]:
    pairs = [f"{label} {m}" for _, label in IN_DOMAIN for m in ("Pixel AUROC", "AUPRO")]
    head = ["variant", *pairs, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, _, _ in VARIANTS:
        means = [_mean(out / name / folder / "results.json") for folder, _ in IN_DOMAIN]
        cells, values = [name], []
        for mean in means:
            for key in ("pixel_auroc", "aupro"):
                v = None if mean is None else mean.get(key)
                cells.append("not run" if mean is None else pct(v))
                values.append(v)
        ok = all(v is not None for v in values)
        cells.append(f"{100 * sum(values) / len(values):.2f}" if ok else "–")  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(out: Path) -> int:
    print("Zero-shot, MVTec AD bottle:\n")
    print("\n".join(bottle_table(out)))
    print("\nIn-domain (held-out test splits of the training datasets):\n")
    print("\n".join(in_domain_table(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

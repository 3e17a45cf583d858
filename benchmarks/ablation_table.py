"""Markdown table of benchmarks/ablation_small.sh's runs (Table III analogue): zero-shot MVTec AD bottle
metrics of each variant and its last training losses.

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


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def main(out: Path) -> int:
    head = ["variant", "LTC", "DSSL"] + [h for _, h in METRICS] + ["last loss_dice", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for name, ltc, dssl in VARIANTS:
        res_file = out / name / "eval_bottle" / "results.json"
        if not res_file.is_file():
            lines.append("| " + " | ".join([name, ltc, dssl] + ["not run"] * (len(head) - 3)) + " |")
            continue
        mean = json.loads(res_file.read_text())["mean"]
        log = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
        dice = [r["loss_dice"] for r in log if r.get("loss_dice") is not None]
        cells = [name, ltc, dssl] + [pct(mean.get(k)) for k, _ in METRICS]
        cells += [f"{sum(dice[-3:]) / len(dice[-3:]):.3f}" if dice else "–", str(log[-1]["step"])]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

"""Markdown tables from ``results.json`` dicts, laid out like the paper's Table I (values in percent, one
decimal; seconds per image as measured; a NaN / null metric is shown as "–")."""

from __future__ import annotations

from collections.abc import Mapping

# (results key, column header); the first four are Table I's Img / AP / Pixel / PRO.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "Img AUROC"),
    ("image_ap", "Img AP"),
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO"),
    ("pixel_ap", "Pixel AP"),
    ("aupro_200", "AUPRO-200"),
    ("f1_max_image", "F1-max img"),
    ("f1_max_pixel", "F1-max px"),
)
# Table I's per-dataset columns: Img (image AUROC), Pixel (pixel AUROC), PRO (AUPRO), AP (image AP).
TABLE_I_COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "Img"),
    ("pixel_auroc", "Pixel"),
    ("aupro", "PRO"),
    ("image_ap", "AP"),
)
DASH = "–"


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; None / NaN as a dash."""
    if value is None or value != value:
        return DASH
    return f"{100.0 * value:.1f}"


def secs(value: float | None) -> str:
    if value is None or value != value:
        return DASH
    return f"{value:.3f}"


def _row(label: str, values: Mapping, counts: str, model_s: float | None, e2e_s: float | None) -> str:
    cells = [label] + [pct(values.get(k)) for k, _ in COLUMNS] + [counts, secs(model_s), secs(e2e_s)]
    return "| " + " | ".join(cells) + " |"


def results_markdown(results: Mapping) -> str:
    """One row per class, a mean row per dataset of several classes (when there are several datasets) and
    the overall mean."""
    classes: Mapping[str, Mapping] = results["classes"]
    timing = results.get("timing", {})
    settings = results.get("settings", {})
    scorer = results.get("scorer", {})
    env = results.get("environment", {})
    head = ["Class"] + [h for _, h in COLUMNS] + ["normal / anomalous", "s/img model", "s/img end-to-end"]
    lines = [
        f"# Evaluation of `{scorer.get('name', '?')}`",
        "",
        f"Split: {settings.get('split')}; maps: {settings.get('map_resize', '?')}; smoothing: "
        f"{settings.get('smoothing', '?')}; date: {env.get('date', '?')}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]

    def counts(rows: list[Mapping]) -> str:
        return f"{sum(r['n_normal'] for r in rows)} / {sum(r['n_anomalous'] for r in rows)}"

    def time_mean(rows: list[Mapping], key: str) -> float | None:
        n = sum(r["n_normal"] + r["n_anomalous"] for r in rows)
        per = [(r.get(key), r["n_normal"] + r["n_anomalous"]) for r in rows]
        if not n or any(v is None for v, _ in per):
            return None
        return sum(v * k for v, k in per) / n

    datasets: Mapping[str, Mapping] = results.get("datasets", {})
    groups = [(label, d["classes"], d["mean"]) for label, d in datasets.items()] if len(datasets) > 1 else [
        (None, list(classes), results["mean"])
    ]
    for label, keys, mean in groups:
        rows = [classes[k] for k in keys]
        for k in keys:
            r = classes[k]
            lines.append(_row(k, r, counts([r]), r.get("model_s_per_image"), r.get("end_to_end_s_per_image")))
        if label is not None and len(rows) > 1:
            lines.append(_row(f"*mean {label}*", mean, counts(rows), time_mean(rows, "model_s_per_image"),
                              time_mean(rows, "end_to_end_s_per_image")))
    all_rows = list(classes.values())
    lines.append(_row("**mean**", results["mean"], counts(all_rows), timing.get("model_s_per_image"),
                      timing.get("end_to_end_s_per_image")))
    lines += [
        "",
        "Values in percent. Mean = unweighted mean over classes, NaN (–) values skipped. "
        f"AP: {settings.get('ap', 'step-wise')}. AUPRO: {settings.get('aupro', 'MVTec AD reference')}. "
        f"AUPRO-200: {settings.get('aupro_200', 'cal_pro_score')}.",
        f"Seconds per image: {timing.get('definition', '')}.",
    ]
    lines += threshold_lines(classes)
    skipped = results.get("skipped") or {}
    for k, why in skipped.items():
        lines.append(f"Skipped {k}: {why}.")
    for k, msgs in (results.get("notes") or {}).items():
        lines.append(f"{k}: " + "; ".join(msgs) + ".")
    return "\n".join(lines) + "\n"


def thr(value: float | None) -> str:
    """A threshold with 4 significant digits; None / NaN as a dash."""
    if value is None or value != value:
        return DASH
    return f"{value:.4g}"


def threshold_lines(classes: Mapping[str, Mapping]) -> list[str]:
    """The per-class thresholds of results.json (``classes.<name>.thresholds``), one list line per class, or
    nothing when no class has them (results written before they existed)."""
    rows = [(k, r["thresholds"]) for k, r in classes.items() if isinstance(r.get("thresholds"), Mapping)]
    if not rows:
        return []
    fpr = rows[0][1].get("fpr")
    at = f"at FPR {100.0 * fpr:g} %" if isinstance(fpr, (int, float)) else "at FPR"
    lines = [
        "",
        "Thresholds (anomalous when score > threshold; image: on the image scores, pixel: on the evaluated "
        f"maps; F1-max: where F1 peaks on these data; {at}: the lowest with at most that share of normals "
        "above it):",
        "",
    ]
    for key, t in rows:
        image, pixel = t.get("image") or {}, t.get("pixel") or {}
        lines.append(
            f"- {key}: image F1-max {thr(image.get('f1_max'))}, {at} {thr(image.get('at_fpr'))}; "
            f"pixel F1-max {thr(pixel.get('f1_max'))}, {at} {thr(pixel.get('at_fpr'))}"
        )
    lines.append("")
    return lines


def table_i_markdown(runs: Mapping[str, Mapping]) -> str:
    """Several methods side by side as in the paper's Table I: one row per method, per dataset the mean
    Img / Pixel / PRO / AP, then the model seconds per image. ``runs`` maps a method name to its results."""
    labels: list[str] = []
    for res in runs.values():
        for label in res.get("datasets", {}) or {"all": None}:
            if label not in labels:
                labels.append(label)
    head = ["Method"] + [f"{label} {h}" for label in labels for _, h in TABLE_I_COLUMNS] + ["Time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, res in runs.items():
        datasets = res.get("datasets") or {"all": {"mean": res["mean"]}}
        cells = [method]
        for label in labels:
            mean = datasets.get(label, {}).get("mean", {})
            cells += [pct(mean.get(k)) for k, _ in TABLE_I_COLUMNS]
        cells.append(secs(res.get("timing", {}).get("model_s_per_image")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""The web page's actions without Gradio, over the random tiny model: analyse, follow up, batch, refusals."""

from __future__ import annotations

import csv
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.errors import VMADError
from vmad.infer.detector import Detector, DetectorConfig
from vmad.web.limits import UploadLimits
from vmad.web.service import BATCH_COLUMNS, WebService, rows_to_csv
from vmad_testing import save_random_image


@pytest.fixture
def service(tiny_model, tmp_path: Path) -> WebService:
    detector = Detector(tiny_model, DetectorConfig(max_new_tokens=4), name="tiny")
    return WebService(detector, UploadLimits(max_file_bytes=64 * 1024), tmp_path / "work")


def test_analyze_writes_mask_overlay_and_json_and_keeps_state(service: WebService, tmp_path: Path) -> None:
    path = save_random_image(tmp_path / "up" / "part.png", (24, 32, 3), 1)
    a = service.analyze(path, class_name="  widget ")
    assert a.overlay.shape == (24, 32, 3) and a.mask.shape == (24, 32) and set(np.unique(a.mask)) <= {0, 255}
    assert [p.name for p in a.files] == ["part.png_mask.png", "part.png_overlay.png", "part.png.json"]
    mask_file = np.array(Image.open(a.files[0]))
    assert np.array_equal(mask_file, a.mask) and np.array_equal(np.array(Image.open(a.files[1])), a.overlay)
    record = json.loads(a.files[2].read_text())
    assert record["file"] == "part.png" and record["class_name"] == "widget" and record["model"] == "tiny"
    assert "source" not in record  # the server's temporary path is not published
    assert record["score"] == pytest.approx(a.score, abs=1e-6)
    assert record["mask_pixels"] == int((a.mask > 0).sum())
    [turn] = record["turns"]
    assert "widget" in turn["question"] and turn["answer"] == a.answer
    assert a.state["history"] == [[turn["question"], a.answer]] and a.note == ""
    json.dumps(a.state)  # Gradio keeps it per session: plain data only


def test_refused_uploads_leave_the_service_working(service: WebService, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(VMADError, match=r"^notes\.png: not a readable image file$"):
        service.analyze(fake)
    big = save_random_image(tmp_path / "big.png", (200, 200, 3))  # ~120 KB > 64 KB
    with pytest.raises(VMADError, match=r"big\.png: .* over the 64 KB limit per image"):
        service.analyze(big)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(save_random_image(tmp_path / "whole.png", (16, 16, 3)).read_bytes()[:80])
    with pytest.raises(VMADError, match=r"^cut\.png: "):
        service.analyze(truncated)
    a = service.analyze(save_random_image(tmp_path / "ok.png", (16, 16, 3)))
    assert a.mask.shape == (16, 16) and a.files[0].is_file()


def test_follow_up_carries_the_history_and_extends_the_json(service: WebService, tmp_path: Path) -> None:
    a = service.analyze(save_random_image(tmp_path / "part.png", (16, 16, 3)))
    reply, state = service.follow_up(a.state, "  Where exactly is it? ")
    assert isinstance(reply, str)
    assert [q for q, _ in state["history"]] == [a.state["history"][0][0], "Where exactly is it?"]
    reply2, state2 = service.follow_up(state, "How severe is it?")
    assert len(state2["history"]) == 3 and state2["history"][-1] == ["How severe is it?", reply2]
    record = json.loads(Path(state2["json"]).read_text())
    assert [t["question"] for t in record["turns"]][1:] == ["Where exactly is it?", "How severe is it?"]
    assert len(a.state["history"]) == 1  # the earlier state is not mutated
    with pytest.raises(VMADError, match="type a question"):
        service.follow_up(state2, "   ")
    with pytest.raises(VMADError, match="upload an image"):
        service.follow_up(None, "Where?")


def test_batch_of_images_and_a_zip_reports_progress_rows_gallery_and_csv(
    service: WebService, tmp_path: Path
) -> None:
    images = [save_random_image(tmp_path / f"img{i}.png", (16, 20, 3), i) for i in range(2)]
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(images[0], "inner/a.png")
        zf.writestr("bad.png", b"text, not pixels")
    calls: list[tuple[int, int, str]] = []
    result = service.run_batch([*images, archive], "widget", answer=False,
                               progress=lambda d, t, n: calls.append((d, t, n)))
    assert calls == [(0, 4, "img0.png"), (1, 4, "img1.png"), (2, 4, "more.zip/inner/a.png"),
                     (3, 4, "more.zip/bad.png"), (4, 4, "done")]
    assert [r["file"] for r in result.rows] == [n for _, _, n in calls[:4]]
    assert result.n_failed == 1 and result.rows[3]["error"] == "more.zip/bad.png: not a readable image file"
    good = result.rows[:3]
    assert all(r["error"] is None and 0.0 <= r["score"] <= 1.0 and r["answer"] is None for r in good)
    assert good[0]["score"] == good[2]["score"]  # the same pixels, inside and outside the zip
    assert len(result.gallery) == 3 and all(p.is_file() for p, _ in result.gallery)
    assert result.gallery[0][1].startswith("img0.png  score ")
    parsed = list(csv.DictReader(io.StringIO(result.csv_path.read_text())))
    assert tuple(parsed[0]) == BATCH_COLUMNS and len(parsed) == 4
    assert parsed[3]["score"] == "" and parsed[3]["error"].endswith("not a readable image file")
    assert float(parsed[0]["score"]) == pytest.approx(good[0]["score"])


def test_a_verdict_threshold_shows_in_the_analysis_and_the_batch(tiny_model, tmp_path: Path) -> None:
    detector = Detector(tiny_model, DetectorConfig(max_new_tokens=4, image_threshold=0.0))
    service = WebService(detector, work_dir=tmp_path / "work")
    image = save_random_image(tmp_path / "p.png", (16, 16, 3))
    a = service.analyze(image)
    assert a.verdict == "anomalous"  # every score is > 0
    assert json.loads(a.files[2].read_text())["verdict"] == "anomalous"
    [row] = service.run_batch([image], answer=False).rows
    assert row["verdict"] == "anomalous"


def test_a_refused_batch_raises_and_the_next_one_runs(service: WebService, tmp_path: Path) -> None:
    service.limits = UploadLimits(max_batch_files=2)
    images = [save_random_image(tmp_path / f"i{i}.png", (8, 8, 3), i) for i in range(3)]
    with pytest.raises(VMADError, match="the batch holds 3 files; the limit is 2"):
        service.run_batch(images)
    result = service.run_batch(images[:2], answer=True)
    assert result.n_failed == 0 and all(isinstance(r["answer"], str) for r in result.rows)


def test_images_over_max_pixels_are_processed_downscaled_with_full_size_files(tiny_model, tmp_path) -> None:
    detector = Detector(tiny_model, DetectorConfig(max_new_tokens=4, max_pixels=20 * 20))
    service = WebService(detector, work_dir=tmp_path / "work")
    a = service.analyze(save_random_image(tmp_path / "wide.png", (40, 60, 3)))
    assert a.overlay.shape[:2] == a.mask.shape == (14, 20)  # previews at the size the model saw (factor 3)
    assert np.array(Image.open(a.files[0])).shape == (40, 60)
    assert np.array(Image.open(a.files[1])).shape == (40, 60, 3)
    assert "processed at 20 x 14" in a.note
    result = service.run_batch([tmp_path / "wide.png"], answer=False)
    [(shown, _)] = result.gallery
    assert shown.name.endswith("_preview.png") and Image.open(shown).size == (20, 14)
    assert result.rows[0]["downscaled"] is True


def test_old_request_folders_are_pruned(service: WebService, tmp_path: Path) -> None:
    old = service.work_dir / "old-request"
    old.mkdir()
    (old / "x.png").write_bytes(b"x")
    past = time.time() - 2 * service.max_age_s
    os.utime(old, (past, past))
    service.analyze(save_random_image(tmp_path / "p.png", (8, 8, 3)))
    assert not old.exists() and len(list(service.work_dir.iterdir())) == 1


def test_rows_to_csv_quotes_text_and_leaves_missing_cells_empty() -> None:
    text = rows_to_csv([{"file": "a, b.png", "score": 0.5, "answer": 'He said "no"', "error": None}])
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["file"] == "a, b.png" and row["answer"] == 'He said "no"' and row["error"] == ""


def test_the_web_package_and_the_commands_import_without_gradio() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['gradio'] = None; import vmad.web, vmad.web.outputs, vmad.cli.serve, "
            "vmad.cli.chat; from vmad.cli import build_parser; build_parser(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

"""`vmad chat` with a tiny checkpoint: first turn, follow-ups with history, /image, /save, errors."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.cli import main
from vmad.infer.detector import Detector
from vmad_testing import save_random_image


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    return (save_random_image(tmp_path / "a" / "part.png", (24, 32, 3), 1),
            save_random_image(tmp_path / "b" / "part.png", (20, 20), 2))


@pytest.fixture
def chat_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The history length of every Detector.chat call (the real method still runs)."""
    calls: list[int] = []
    real = Detector.chat

    def spy(self, image, history, question, **kw):  # noqa: ANN001, ANN202
        calls.append(len(history))
        return real(self, image, history, question, **kw)

    monkeypatch.setattr(Detector, "chat", spy)
    return calls


def _chat(monkeypatch: pytest.MonkeyPatch, stdin: str, *argv: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["chat", *argv, "--max-new-tokens", "4"])


def test_piped_session_with_follow_ups_image_switch_and_save(
    tiny_ckpt, images, tmp_path, monkeypatch, capsys, chat_calls
) -> None:
    first, second = images
    out, saved = tmp_path / "out", tmp_path / "saved"
    script = (f"Where exactly?\n\nHow severe is it?\n/image {second}\nWhat should we do?\n/save {saved}\n"
              "/quit\nignored\n")
    rc = _chat(monkeypatch, script, str(first), "--model", str(tiny_ckpt), "--out", str(out),
               "--class-name", "widget")
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"image   {first} (32 x 24)" and "widget" in lines[1]
    assert lines[2].startswith("score   ") and lines[3].startswith("vmad>   ")
    assert lines[5] == f"wrote   {out / 'part.png_mask.png'} and {out / 'part.png_overlay.png'}"
    assert [x for x in lines if x.startswith("you>")] == [
        "you>    Where exactly?", "you>    How severe is it?", "you>    What should we do?"]
    assert chat_calls == [1, 2, 1]  # the history grows; a new image starts a new conversation
    mask = np.array(Image.open(out / "part.png_mask.png"))
    assert mask.shape == (24, 32) and set(np.unique(mask)) <= {0, 255}
    assert np.array(Image.open(out / "part.png~2_mask.png")).shape == (20, 20)  # same name, other folder
    transcript = json.loads((saved / "transcript.json").read_text())
    turns = transcript["turns"]
    questions = [t["question"] for t in turns]
    assert questions[1:3] == ["Where exactly?", "How severe is it?"] and questions[4] == "What should we do?"
    assert questions[0] == questions[3] and "widget" in questions[0]  # each image's first, default question
    assert [t["image"] for t in turns] == [str(first)] * 3 + [str(second)] * 2
    for t in turns:
        assert np.array(Image.open(saved / t["mask"])).shape == (np.array(Image.open(t["image"])).shape[:2])
        assert (saved / t["overlay"]).is_file() and 0.0 <= t["score"] <= 1.0
    md = (saved / "transcript.md").read_text()
    assert "## Turn 5" in md and "**You:** What should we do?" in md


def test_failing_lines_print_an_error_and_the_session_goes_on(
    tiny_ckpt, images, tmp_path, monkeypatch, capsys
) -> None:
    first, _ = images
    script = f"/frobnicate\n/image {tmp_path / 'missing.png'}\n/save\nStill there?\n"
    rc = _chat(monkeypatch, script, str(first), "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"))
    captured = capsys.readouterr()
    assert rc == 2  # piped: some line failed
    errors = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert len(errors) == 3
    assert "unknown command /frobnicate" in errors[0] and "missing.png: file not found" in errors[1]
    assert "missing argument: /save DIR" in errors[2]
    assert "you>    Still there?" in captured.out


def test_bad_image_or_options_fail_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Detector, "from_pretrained", no_load)
    fake = tmp_path / "notes.png"
    fake.write_text("text")
    assert _chat(monkeypatch, "", str(fake), "--model", str(tiny_ckpt)) == 2
    assert capsys.readouterr().err.strip() == f"error: {fake}: not a readable image file"
    good = save_random_image(tmp_path / "ok.png", (8, 8, 3))
    assert _chat(monkeypatch, "", str(good), "--model", str(tiny_ckpt), "--alpha", "2") == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
    assert _chat(monkeypatch, "", str(good), "--model", str(tmp_path / "nowhere")) == 2


def test_interactive_prompt_reads_until_end_of_input(
    tiny_ckpt, images, tmp_path, monkeypatch, capsys, chat_calls
) -> None:
    first, _ = images
    stdin = io.StringIO("")
    stdin.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stdin", stdin)
    typed = iter(["Where?", "/help"])

    def fake_input(prompt: str) -> str:
        assert prompt == "you> "
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    rc = main(["chat", str(first), "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"),
               "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and chat_calls == [1]
    assert "you>    Where?" not in out  # the prompt shows the question already; no echo
    assert out.count("commands: /image PATH") == 2  # once at the start, once for /help


def test_threshold_file_gives_a_verdict_and_an_explicit_threshold_wins(
    tiny_ckpt, images, tmp_path, monkeypatch, capsys
) -> None:
    first, second = images
    detector = Detector.from_pretrained(tiny_ckpt, device="cpu")
    detector.name = str(tiny_ckpt)
    calibration = detector.calibrate([first, second])
    thresholds = calibration.save(tmp_path / "t.json")
    saved = tmp_path / "saved"
    rc = _chat(monkeypatch, f"/save {saved}\n", str(first), "--model", str(tiny_ckpt),
               "--out", str(tmp_path / "o"), "--threshold-file", str(thresholds), "--threshold", "0")
    assert rc == 0
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("verdict ")]
    assert line.split()[1] in ("anomalous", "normal") and f"{calibration.image_threshold:.4f}" in line
    [turn] = json.loads((saved / "transcript.json").read_text())["turns"]
    assert turn["verdict"] == line.split()[1]
    mask = np.array(Image.open(saved / turn["mask"]))
    assert (mask == 255).all()  # --threshold 0 wins over the file's mask threshold: every pixel is > 0

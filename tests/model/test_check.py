"""`vmad model check`: the pre-flight checks of a preset, on tiny Hugging Face folders saved in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmad.cli import main
from vmad_testing import tiny_hf_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    llava, sam, _ = tiny_hf_folders(tmp_path_factory.mktemp("hf"), randomize_projector=True)
    return llava, sam


def _small_paper_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper preset at the tiny folders' shapes (as tests/vmad_testing.tiny_paper_config)."""
    from vmad.model import build
    from vmad_testing import tiny_paper_config

    original, paper = build.preset_config, tiny_paper_config()
    monkeypatch.setattr(build, "preset_config", lambda name: paper if name == "paper" else original(name))


def test_check_passes_on_a_complete_model(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _small_paper_overrides(monkeypatch)
    args = ["model", "check", "--llava-path", str(folders[0]), "--sam-path", str(folders[1]), "--tokens", "3"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and {
        "vocabulary",
        "<seg> id",
        "<image> id",
        "projector",
        "segment",
        "generate",
    } <= set(names)
    assert "llava_multi_modal_projector" in names["projector"]["detail"]
    assert report["timings_s"]["segment_s"] > 0 and report["peak_memory_mb"]["process_rss"] > 0
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ok  <seg> id" in text and "peak memory:" in text and "FAIL" not in text


def test_missing_or_wrong_folders_are_one_line(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "check", "--sam-path", str(folders[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "llava" in err[0].lower()
    assert main(["model", "check", "--llava-path", str(tmp_path), "--sam-path", str(folders[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "config.json" in err[0]

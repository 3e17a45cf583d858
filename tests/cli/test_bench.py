"""`vmad bench` on the tiny preset (random weights, CPU): the JSON keys the issue lists for VMAD and for the
stock LLaVA + SAM pipeline measured in the same run, the Markdown record, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vmad.cli import main
from vmad.eval.speed import KEYS

FAST = ["--repeats", "2", "--batch-repeats", "1", "--warmup", "0", "--tokens", "12", "--batches", "1,2"]


def test_bench_tiny_json_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "results" / "bench.md"
    code = main(["bench", "--preset", "tiny", "--json", "--out", str(record), *FAST])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    stock = result["stock"]
    for key in KEYS:
        assert result[key] is not None and stock[key] is not None, key
    assert result["device"] == stock["device"] == "cpu"
    assert result["best_batch"] in (1, 2) and set(result["images_per_s_by_batch"]) == {"1", "2"}
    assert result["images_per_s_best"] == max(result["images_per_s_by_batch"].values())
    assert result["seg_ms_batch1_p90"] >= result["seg_ms_batch1_median"] > 0
    assert result["images_per_s_batch1"] == pytest.approx(1000 / result["seg_ms_batch1_median"])
    assert result["decode_tokens_per_s"] > 0 and result["peak_memory_bytes"] > 0
    assert "tiny encoder's shape" in stock["shapes"]["vision"] and "scaled-down" in stock["shapes"]["sam"]
    assert stock["image_tokens"] == 64 and result["visual_tokens"] == 16  # CLIP grid 8x8; LTC rho 2
    assert set(result["ratio"]) >= {"seg_ms_batch1_median", "images_per_s_best", "decode_tokens_per_s"}
    assert result["load_average"] is not None and result["date"]
    text = record.read_text()
    assert "vmad bench --preset tiny --device cpu" in text and "load average at start" in text
    assert "| segmentation only, batch 1, median (ms) |" in text and "no GPU" in text


def test_bench_without_stock_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "tiny", "--no-stock", *FAST]) == 0
    out = capsys.readouterr().out
    assert "preset tiny (random weights) on cpu" in out and "decode tokens/s" in out and "n/a" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--random-weights"], "--random-weights needs --preset"),
        (["--preset", "tiny", "--batches", "1,x"], "expected integers"),
        (["--preset", "tiny", "--tokens", "1"], "decode tokens must be >= 2"),
        (["--preset", "tiny", "--batches", "0"], "batch sizes must be >= 1"),
        (["--model", "no/such/folder"], "no such model folder"),
    ],
)
def test_bad_options_are_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0]

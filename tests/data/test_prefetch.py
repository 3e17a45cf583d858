"""Image decoding ahead of the model (vmad.data.prefetch): batches in order, the same pixels with and without
worker processes, unreadable files reported as their DataError."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from vmad.data.io import read_image, read_image_bounded
from vmad.data.prefetch import prefetch
from vmad.errors import ConfigError, DataError
from vmad_testing import save_random_image


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [save_random_image(tmp_path / f"{i}.png", (20 + i, 30, 3), seed=i) for i in range(5)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    return [*paths[:2], broken, *paths[2:]]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_in_order_with_the_same_pixels(files: list[Path], workers: int) -> None:
    batches = list(prefetch(files, read_image, batch_size=2, workers=workers))
    assert [[index for index, _, _ in batch] for batch in batches] == [[0, 1], [2, 3], [4, 5]]
    for batch in batches:
        for index, pixels, error in batch:
            if index == 2:
                assert pixels is None and isinstance(error, DataError)
                assert str(error).startswith(str(files[2]))
            else:
                assert error is None
                np.testing.assert_array_equal(pixels, read_image(files[index]))


def test_tuples_of_arrays_and_sizes_come_back(files: list[Path]) -> None:
    read = functools.partial(read_image_bounded, max_pixels=100)
    [batch] = list(prefetch(files[:2], read, batch_size=4, workers=1))
    (_, (pixels, size), error) = batch[1]
    assert error is None and size == (21, 30) and pixels.shape[0] * pixels.shape[1] <= 100


def test_bad_settings_are_config_errors(files: list[Path]) -> None:
    with pytest.raises(ConfigError, match="workers"):
        list(prefetch(files, read_image, batch_size=2, workers=-1))
    with pytest.raises(ConfigError, match="batch size"):
        list(prefetch(files, read_image, batch_size=0))
    assert list(prefetch([], read_image, batch_size=2, workers=2)) == []

"""Image decoding ahead of the model: a torch ``DataLoader`` whose worker processes read and decode the next
batches while the current one is being processed (``vmad detect``, ``vmad eval``).

:func:`prefetch` yields batches in order; each item is ``(index, value, error)``: ``value`` what ``load``
returned (numpy arrays come back as arrays), or ``error`` the ``DataError`` it raised (rebuilt in the
calling process, so a caller can raise it, or skip an unreadable file and go on). ``workers`` 0 reads in
the calling process, one batch at a time (no overlap); each worker reads whole batches, ``prefetch_factor``
(2) batches ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vmad.errors import ConfigError, DataError

Item = tuple[int, Any, DataError | None]


def _to_shared(value: Any) -> Any:
    """Numpy arrays as tensors (workers hand tensors over in shared memory, not through a pipe)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, tuple):
        return tuple(_to_shared(v) for v in value)
    return value


def _from_shared(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, tuple):
        return tuple(_from_shared(v) for v in value)
    return value


class _Loaded(Dataset):
    """``load(items[i])`` for index i, a DataError caught as its path and problem."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any]) -> None:
        self.items = list(items)
        self.load = load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Any, tuple[str, str] | None]:
        try:
            return index, _to_shared(self.load(self.items[index])), None
        except DataError as exc:
            return index, None, (str(exc.path), exc.problem)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def prefetch(
    items: Sequence[Any], load: Callable[[Any], Any], batch_size: int, workers: int = 1
) -> Iterator[list[Item]]:
    """Batches of ``(index, load(items[index]) or None, its DataError or None)``, in order, decoded by
    ``workers`` processes ahead of use (see the module docstring). ``load`` must be picklable (a module-level
    function or a ``functools.partial`` of one)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    workers = min(workers, -(-len(items) // batch_size)) if items else 0
    loader = DataLoader(
        _Loaded(items, load),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=2 if workers else None,
    )
    for batch in loader:
        yield [
            (index, _from_shared(value), None if error is None else DataError(*error))
            for index, value, error in batch
        ]

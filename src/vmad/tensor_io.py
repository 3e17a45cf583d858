"""Writing safetensors files with the permissions a user expects.

``safetensors.torch.save_file`` creates files readable by their owner only (0600); checkpoints and exported
weights are meant to be shared, so :func:`save_safetensors` gives them the usual ``0666 & ~umask``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor


def default_file_mode() -> int:
    """``0o666`` minus the process umask (what ``open(path, "w")`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` (detached, contiguous, on the CPU) to ``path``, fsync'ed, with the default mode."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, default_file_mode())
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())

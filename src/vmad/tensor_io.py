"""Writing safetensors files atomically, with the permissions a user expects.

``safetensors.torch.save_file`` creates files readable by their owner only (0600); checkpoints and exported
weights are meant to be shared, so :func:`save_safetensors` gives them the usual ``0666 & ~umask``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from vmad.atomic import atomic_path, default_file_mode


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` (detached, contiguous, on the CPU) to ``path`` atomically (a temporary file beside
    it, fsync'ed, then ``os.replace``), with the default file mode."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, default_file_mode())

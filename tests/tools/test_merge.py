"""merge_to_dir: the merged model directory loads with plain transformers and computes the adapted function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.tools import merge_to_dir

from .helpers import input_ids, logits, perturb, tiny_llama, trained_adapter

ATOL = 1e-5


class _Tokenizer:
    """Stands in for a tokenizer: merge_to_dir only calls save_pretrained."""

    def save_pretrained(self, where) -> None:
        (where / "tokenizer.json").write_text("{}")


@pytest.fixture()
def adapted(tmp_path):
    model, adapter_dir = trained_adapter(tmp_path / "adapter", r=4, lora_alpha=8, rank_pattern={"v_proj": 2})
    return model, adapter_dir, logits(model, input_ids())


def test_merge_from_path_loads_with_transformers(tmp_path, adapted):
    from transformers import AutoModelForCausalLM

    _, adapter_dir, expected = adapted
    tiny_llama().save_pretrained(tmp_path / "base")
    out = merge_to_dir(tmp_path / "base", adapter_dir, tmp_path / "merged", tokenizer=_Tokenizer())
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("adapters" in n or "lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, input_ids()), expected, atol=ATOL, rtol=0)


def test_merge_from_module(tmp_path, adapted):
    from transformers import AutoModelForCausalLM

    _, adapter_dir, expected = adapted
    merge_to_dir(tiny_llama(), adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, input_ids()), expected, atol=ATOL, rtol=0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_plain_module_saved_as_safetensors(tmp_path):
    from safetensors.torch import load_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["0", "2"], r=2))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(3, 8)
    expected = model(x).detach()
    merge_to_dir(copy.deepcopy(base), tmp_path / "adapter", tmp_path / "merged")
    fresh = copy.deepcopy(base)
    load_model(fresh, str(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(fresh(x), expected, atol=ATOL, rtol=0)


def test_existing_output_refused_then_overwritten(tmp_path, adapted):
    _, adapter_dir, expected = adapted
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_to_dir(tiny_llama(), adapter_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge_to_dir(tiny_llama(), adapter_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failed_merge_leaves_no_output(tmp_path):
    with pytest.raises(peftkit.CheckpointError):
        merge_to_dir(tiny_llama(), tmp_path / "no-adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert list(tmp_path.iterdir()) == []

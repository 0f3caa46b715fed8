"""Shared helpers of the training-loop tests: a tiny seeded Llama with an adapter, and deterministic batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import AdapterModel, LoraConfig

VOCAB, SEQ, BATCH, N_BATCHES = 64, 12, 2, 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base(dropout: float = 0.0):
    """The same tiny LlamaForCausalLM every call (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=dropout,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def tiny_model(dropout: float = 0.0, adapter_seed: int = 0, r: int = 4) -> AdapterModel:
    """Tiny Llama + one trainable adapter "default"; `adapter_seed` drives the adapter init."""
    model = AdapterModel(tiny_base(dropout))
    torch.manual_seed(adapter_seed)
    model.add_adapter("default", LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=dropout))
    return model


def batches_fn(epoch: int, seed: int = 0, n: int = N_BATCHES, pattern: bool = False) -> list[dict[str, torch.Tensor]]:
    """`n` batches for `epoch` from a private generator. pattern=True: learnable rows (t, t+1, t+2, ...) mod V."""
    g = torch.Generator().manual_seed(1000 * seed + epoch)
    out = []
    for _ in range(n):
        if pattern:
            start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
            ids = (start + torch.arange(SEQ)) % VOCAB  # (B, T)
        else:
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)  # (B, T)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # a padded tail, so tokens/s counts the mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def adapter_tensors(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(params, optimizer tensors, trainer_state.json) of a checkpoint dir."""
    state = json.loads((path / "trainer_state.json").read_text())
    return load_file(path / "params.safetensors"), load_file(path / "optimizer.safetensors"), state


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared helpers of the tools tests: a seeded tiny Llama, inputs, a perturbed saved adapter, logits."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

import peftkit

VOCAB = 96


@functools.cache
def _llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """A fresh copy of the seeded tiny Llama."""
    return copy.deepcopy(_llama(seed))


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))  # (B, T)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(ids).logits.detach().clone()  # (B, T, V)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 123, scale: float = 0.05) -> None:
    """Seeded noise on every trainable tensor, as a stand-in for a few training steps (B moves off zero)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


def trained_adapter(where: Path, convert: bool = False, **config) -> tuple[peftkit.PeftModel, Path]:
    """A perturbed adapter with `config` on the tiny Llama, saved to `where`; returns (adapted model, where)."""
    config.setdefault("target_modules", ["q_proj", "v_proj", "up_proj"])
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**config))
    perturb(model)
    model.save_pretrained(where, convert_to_original_base=convert)
    return model.eval(), where

"""Shared helpers for the checkpoint tests: tiny base models, inputs, seeded perturbation, logits."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

VOCAB = 128
SEQ = 8


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    return GPT2LMHeadModel(cfg)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=32, num_labels=3, initializer_range=0.2)
    return BertForSequenceClassification(cfg)


class TinyConv(nn.Module):
    """A plain torch conv net: conv1 -> relu -> conv2 -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


def tiny_conv() -> nn.Module:
    return TinyConv()


def tiny_conv1d() -> nn.Module:
    """Conv1d layers (padding, stride; peft ignores dilation in its LoRA conv), channels-first input."""
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 6, 3, stride=2), nn.Flatten(1))


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "conv": tiny_conv, "conv1d": tiny_conv1d}


@functools.cache
def _built(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def build_base(kind: str, seed: int = 0) -> nn.Module:
    """A fresh copy of the seeded tiny base model of `kind` ("llama", "gpt2", "bert", "conv")."""
    return copy.deepcopy(_built(kind, seed))


def make_input(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        return torch.randn(2, 3, 9, 9, generator=g)
    if kind == "conv1d":
        return torch.randn(2, 4, 11, generator=g)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    ids[1, -1] = 0  # BERT's padding_idx: embedding adapters must skip it the same way
    return ids


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x)
    return (out if isinstance(out, torch.Tensor) else out.logits).detach().clone()


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int = 123, scale: float = 0.05) -> int:
    """Add seeded noise to every trainable parameter (so B != 0, magnitudes and biases move off their init).
    Returns how many parameters were changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            n += 1
    return n


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()

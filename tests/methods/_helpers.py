"""Shared helpers for the method tests: tiny models, seeded inputs, peft oracle access, tolerances."""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 96
SEQ = 6


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


class Mixed(nn.Module):
    """Embedding -> Linear -> Linear, plus a Conv2d branch: every layer type LoRA supports besides Conv1D."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.fc1(self.emb(ids)))).mean(1)  # (N, 8)
        return h + self.conv(img).mean(dim=(2, 3))  # (N, 8)


def mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed().eval()


def mixed_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (3, 5), generator=g), torch.randn(3, 3, 7, 7, generator=g)


def token_ids(seed: int = 1, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


@torch.no_grad()
def logits(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    out = model(*inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).detach().clone()


@torch.no_grad()
def perturb(params, seed: int = 123, scale: float = 0.1) -> int:
    """Add seeded noise to the given (name, parameter) pairs that require grad; returns how many moved."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for _, p in sorted(params, key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            n += 1
    return n


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """max|a - b| <= rel * (1 + max|b|) (the spec's forward tolerance)."""
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() <= rel * (1 + b.abs().max().item())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def peft_lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module path under the wrapped model: peft LoraLayer} for a peft model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def both(base: nn.Module, **config):
    """(peft model, peftkit model) built from deep copies of `base` with the same LoraConfig keywords."""
    import peft

    import peftkit

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    km = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**config))
    return pm, km


def hosts(model) -> dict[str, nn.Module]:
    """{path: AdaptedLayer} of a peftkit model."""
    from peftkit.core.host import AdaptedLayer

    return {p: h for p, h in model.hosts() if isinstance(h, AdaptedLayer)}

"""add_weighted_adapter: combine trained adapters into a new LoRA adapter.

linear / cat: exact. The new delta is sum_i w_i * delta_i, written as one LoRA of rank sum(r_i) by
    concatenating factors: A = [A_1; ...; A_n], B = [w_1 s_1 B_1, ..., w_n s_n B_n], s = 1. (peft's "linear"
    mixes factors, sum_i sqrt(w_i s_i) B_i times sum_i sqrt(w_i s_i) A_i, which is not the weighted sum.)
svd: the weighted sum of deltas, truncated to `svd_rank` by SVD.
ties (arXiv 2306.01708), dare_linear / dare_ties (arXiv 2311.03099), magnitude_prune: applied to the
    weighted delta weights tau_i = w_i * delta_i (peft's "*_svd" variants), then truncated by SVD.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.host import AdaptedLayer
from ..core.model import AdapterModel
from ..errors import ConfigError
from .lora import LoraConfig

__all__ = ["add_weighted_adapter", "COMBINATIONS", "ties", "dare", "magnitude_prune"]


def _prune_by_magnitude(t: Tensor, density: float) -> Tensor:
    """Keep the `density` fraction of entries with the largest |t|, zero the rest."""
    k = int(round(density * t.numel()))
    if k <= 0:
        return torch.zeros_like(t)
    threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return t * (t.abs() >= threshold)


def _dare_drop(t: Tensor, density: float, gen: torch.Generator) -> Tensor:
    """Drop entries with probability 1 - density, rescale the kept ones by 1 / density."""
    keep = torch.rand(t.shape, generator=gen) < density
    return t * keep / density


def _elect_and_merge(taus: list[Tensor], method: str) -> Tensor:
    """TIES sign election and disjoint mean over the entries that agree with the elected sign."""
    stack = torch.stack(taus)  # (n, out, in)
    votes = stack.sum(0) if method == "total" else stack.sign().sum(0)
    sign = torch.where(votes >= 0, 1.0, -1.0)  # (out, in)
    agree = (stack.sign() == sign) & (stack != 0)  # (n, out, in)
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def ties(taus: list[Tensor], density: float, method: str = "total", **_) -> Tensor:
    return _elect_and_merge([_prune_by_magnitude(t, density) for t in taus], method)


def dare(taus: list[Tensor], density: float, gen: torch.Generator, elect: bool = False, method: str = "total",
         **_) -> Tensor:
    dropped = [_dare_drop(t, density, gen) for t in taus]
    return _elect_and_merge(dropped, method) if elect else torch.stack(dropped).sum(0)


def magnitude_prune(taus: list[Tensor], density: float, **_) -> Tensor:
    return torch.stack([_prune_by_magnitude(t, density) for t in taus]).sum(0)


_REDUCERS: dict[str, Callable[..., Tensor]] = {
    "svd": lambda taus, **_: torch.stack(taus).sum(0),
    "ties": ties,
    "dare_linear": dare,
    "dare_ties": lambda taus, **kw: dare(taus, elect=True, **kw),
    "magnitude_prune": magnitude_prune,
}
COMBINATIONS = ("linear", "cat", *_REDUCERS)


Factors = tuple[Tensor, Tensor, Tensor | None]  # A (r, in...), B (out, r...), bias of B or None


def _concat(host: AdaptedLayer, parts: list[tuple[str, float]], where: str) -> Factors:
    a_list, b_list, bias = [], [], None
    for name, weight in parts:
        adapter = host.adapters[name]
        low = adapter.lowered()
        if low is None or not low.plain:  # channel-scaled forms (DoRA) do not add up linearly
            raise ConfigError("combination_type", f"{where}: adapter {name!r} has no plain low-rank form, "
                                                  "so linear/cat cannot be exact; use 'svd' or 'ties'")
        a_list.append(low.a.detach().float())
        b_list.append(low.b.detach().float() * (weight * low.scale))
        b_bias = getattr(adapter, "lora_B_bias", None)
        if b_bias is not None:
            bias = (0 if bias is None else bias) + b_bias.detach().float() * (weight * low.scale)  # (out,)
    return torch.cat(a_list, dim=0), torch.cat(b_list, dim=1), bias  # (sum r, in...), (out, sum r...)


def _truncate(delta: Tensor, rank: int, ops) -> Factors:
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, sv.numel())
    return vh[:k].reshape(ops.a_shape(k)), (u[:, :k] * sv[:k]).reshape(ops.b_shape(k)), None


def _layer_factors(host: AdaptedLayer, parts, kind: str, rank: int, opts: dict, where: str) -> Factors:
    if kind in ("linear", "cat"):
        return _concat(host, parts, where)
    if any(getattr(host.adapters[n], "lora_B_bias", None) is not None for n, _ in parts):
        raise ConfigError("combination_type", f"{where}: adapters with lora_bias combine exactly only with "
                                              "'linear' or 'cat'")
    w = host.ops.weight2d().float()
    taus = [weight * (host.merge_result([name])[0] - w) for name, weight in parts]  # true deltas, (out, in_flat)
    return _truncate(_REDUCERS[kind](taus, **opts), rank, host.ops)


def _check(model: AdapterModel, adapters: list[str], weights: list[float], kind: str, density) -> None:
    model._check_names(adapters)
    if kind not in COMBINATIONS:
        raise ConfigError("combination_type", f"unknown {kind!r}; choose one of {COMBINATIONS}")
    if not adapters or len(adapters) != len(weights):
        raise ConfigError("weights", f"need one weight per adapter, got {len(weights)} for {len(adapters)}")
    if kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune") and not (density and 0 < density <= 1):
        raise ConfigError("density", f"{kind} needs density in (0, 1], got {density!r}")


def add_weighted_adapter(model: AdapterModel, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total", seed: int | None = None) -> None:
    """Add `adapter_name`, a LoRA adapter combining `adapters` (inactive, not trainable; see module doc)."""
    _check(model, adapters, weights, combination_type, density)
    rank = svd_rank or max(getattr(model.configs[n], "r", 8) for n in adapters)
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    opts = {"density": density, "method": majority_sign_method, "gen": gen}
    factors = {}
    for path, host in model.hosts():
        if not isinstance(host, AdaptedLayer):
            continue
        parts = [(n, w) for n, w in zip(adapters, weights, strict=True) if n in host.adapters]
        if parts:
            factors[path] = _layer_factors(host, parts, combination_type, rank, opts, path)
    ranks = {"^" + re.escape(p): f[0].shape[0] for p, f in factors.items()}  # exact-path keys
    top = max(ranks.values())
    exact_paths = "|".join(re.escape(p) for p in factors)  # a str target is fullmatched: no suffix surprises
    with_bias = any(f[2] is not None for f in factors.values())
    config = LoraConfig(target_modules=exact_paths, r=top, lora_alpha=top, rank_pattern=ranks, alpha_pattern=ranks,
                        lora_bias=with_bias)
    plan = model.plan_adapter(adapter_name, config, initialize=False)
    with torch.no_grad():
        for path, adapter in plan.adapters.items():
            a, b, bias = factors[path]
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
            if bias is not None:
                adapter.lora_B_bias.copy_(bias)
    model.commit_adapter(plan, active=False, trainable=False)

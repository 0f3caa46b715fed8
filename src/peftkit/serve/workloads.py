"""Adapter-per-request workloads as in Punica (arXiv 2310.18547): which adapter each of n requests uses."""

from __future__ import annotations

import torch

__all__ = ["WORKLOADS", "sample_adapters"]

WORKLOADS = ("distinct", "uniform", "zipf", "identical")


def sample_adapters(workload: str, n: int, n_adapters: int, generator: torch.Generator | None = None,
                    zipf_a: float = 1.5) -> list[int]:
    """Adapter index per request. distinct: all different (i mod n_adapters); uniform: uniform over
    n_adapters; zipf: P(k) ~ 1/(k+1)^a over n_adapters (a = 1.5); identical: all adapter 0."""
    if workload == "distinct":
        return [i % n_adapters for i in range(n)]
    if workload == "identical":
        return [0] * n
    if workload == "uniform":
        return torch.randint(n_adapters, (n,), generator=generator).tolist()
    if workload == "zipf":
        p = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64) ** zipf_a
        return torch.multinomial(p / p.sum(), n, replacement=True, generator=generator).tolist()
    raise ValueError(f"workload {workload!r} is unknown; use one of {WORKLOADS}")

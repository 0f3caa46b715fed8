"""Per-layer statistics of a saved low-rank adapter: how big each update is and how many directions it uses.

For every adapted module with factors A (r, in) and B (out, r) and scale s, the update is dW = s B A. Why
these numbers: ||dW||_F shows where training moved the model; the singular values and the effective rank
show whether the rank budget is used (an effective rank far below r suggests a smaller r would do).

All of it is computed through the factors, never forming the (out, in) matrix:
  ||s B A||_F^2 = s^2 sum((B^T B) * (A A^T))                  (the r x r Gram trick)
  B = Q_B R_B, A^T = Q_A R_A  =>  dW = Q_B (s R_B R_A^T) Q_A^T, so svd(dW) = svd(s R_B R_A^T)   (exact)
  effective rank (Roy & Vetterli 2007) = exp(H(p)), p_i = sigma_i / sum_j sigma_j.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checkpoint import read_adapter
from ..checkpoint.peft_format import PREFIX
from ..core.config import AdapterConfig
from ..errors import CheckpointError
from .export import EMBEDDING_FACTOR_SUFFIXES, FACTOR_SUFFIXES, split_key

__all__ = ["LayerStats", "TensorStats", "inspect_adapter", "factor_stats", "effective_rank", "format_table",
           "spectrum_plot"]

_PAIRS = (FACTOR_SUFFIXES, EMBEDDING_FACTOR_SUFFIXES)  # (A suffix, B suffix) per layer kind


@dataclass(frozen=True)
class TensorStats:
    """Another tensor stored for the module (e.g. a per-channel magnitude or a bias): its size and spread."""

    name: str
    shape: tuple[int, ...]
    norm: float
    mean: float
    rms_from_one: float  # sqrt(mean((v - 1)^2)): how far a multiplicative per-channel vector is from identity


@dataclass(frozen=True)
class LayerStats:
    """Statistics of dW = s B A on one module (see the module docstring)."""

    name: str
    r: int
    scale: float
    fro_norm: float
    singular_values: tuple[float, ...]  # descending, r of them
    effective_rank: float
    extras: tuple[TensorStats, ...] = field(default=())


def effective_rank(sv: Tensor) -> float:
    """exp(entropy of sv / sum(sv)); 0 for an all-zero spectrum. Between 1 and the number of nonzero values."""
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv[sv > 0] / total  # (k,)
    return math.exp(float(-(p * p.log()).sum()))


def factor_stats(a: Tensor, b: Tensor, scale: float) -> tuple[float, Tensor]:
    """(||s B A||_F, singular values of s B A) from A (r, in_flat) and B (out, r), in float64."""
    a, b = a.double(), b.double()
    gram = ((b.T @ b) * (a @ a.T)).sum()  # sum((B^T B) * (A A^T)) = ||B A||_F^2
    fro = abs(scale) * math.sqrt(max(float(gram), 0.0))
    _, r_b = torch.linalg.qr(b)  # (k1, r)
    _, r_a = torch.linalg.qr(a.T)  # (k2, r)
    sv = torch.linalg.svdvals(scale * (r_b @ r_a.T))  # (min(k1, k2),), descending
    r = a.shape[0]
    return fro, torch.cat([sv, sv.new_zeros(max(r - sv.numel(), 0))])[:r]  # (r,)


def _factors(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{module path: (A, B)} flattened to (r, in_flat) and (out, r), for linear, conv and embedding factors."""
    found: dict[str, dict[str, Tensor]] = {}
    suffixes = tuple(s for pair in _PAIRS for s in pair)
    for key, t in tensors.items():
        hit = split_key(key, suffixes)
        if hit is not None:
            found.setdefault(hit[0], {})[hit[1]] = t
    out = {}
    for path, parts in sorted(found.items()):
        pair = next((p for p in _PAIRS if set(p) <= set(parts)), None)
        if pair is None:
            raise CheckpointError(f"{path}: has {sorted(parts)} but not both factors of one kind {_PAIRS}")
        out[path] = parts[pair[0]].flatten(1), parts[pair[1]].flatten(1)  # (r, in_flat), (out, r)
    return out


def _extras(paths: list[str], tensors: dict[str, Tensor]) -> dict[str, tuple[TensorStats, ...]]:
    """{module path: stats of every non-factor tensor stored under it}; a key belongs to the longest adapted
    path that prefixes it. Keys under no adapted module (e.g. module copies) are left out."""
    factor_suffixes = {s for pair in _PAIRS for s in pair}
    out: dict[str, list[TensorStats]] = {p: [] for p in paths}
    for key in sorted(tensors):
        owners = [p for p in paths if key.startswith(f"{PREFIX}{p}.")]
        if not owners:
            continue
        owner = max(owners, key=len)
        rest = key[len(PREFIX) + len(owner) + 1:]
        if rest in factor_suffixes:
            continue
        t = tensors[key].double()
        out[owner].append(TensorStats(rest, tuple(t.shape), float(t.norm()), float(t.mean()),
                                      float((t - 1).square().mean().sqrt())))
    return {p: tuple(v) for p, v in out.items()}


def _scale(config: AdapterConfig, path: str) -> float:
    """The module's scale from its config (`scaling`), 1.0 for configs without one."""
    return float(getattr(config.for_module(path), "scaling", 1.0))


def inspect_adapter(adapter_dir: str | os.PathLike) -> list[LayerStats]:
    """LayerStats for every adapted module of the adapter in `adapter_dir`, sorted by module path."""
    config, tensors = read_adapter(adapter_dir)
    factors = _factors(tensors)
    extras = _extras(list(factors), tensors)
    stats = []
    for path, (a, b) in factors.items():
        scale = _scale(config, path)
        fro, sv = factor_stats(a, b, scale)
        stats.append(LayerStats(path, a.shape[0], scale, fro, tuple(sv.tolist()), effective_rank(sv), extras[path]))
    return stats


def format_table(stats: list[LayerStats], top: int = 3) -> str:
    """A fixed-width text table: module, r, scale, ||dW||_F, effective rank, the `top` largest singular values
    and the norms of extra tensors."""
    width = max([len("module")] + [len(s.name) for s in stats])
    head = f"{'module':<{width}}  {'r':>5}  {'scale':>8}  {'||dW||_F':>10}  {'eff.rank':>8}  top singular values"
    lines = [head, "-" * len(head)]
    for s in stats:
        svs = " ".join(f"{v:.3g}" for v in s.singular_values[:top])
        extra = "".join(f"  |{e.name}|={e.norm:.3g}" for e in s.extras)
        lines.append(f"{s.name:<{width}}  {s.r:>5d}  {s.scale:>8.4g}  {s.fro_norm:>10.4g}  "
                     f"{s.effective_rank:>8.2f}  {svs}{extra}")
    return "\n".join(lines)


def spectrum_plot(stats: list[LayerStats], path: str | os.PathLike, legend_max: int = 12) -> None:
    """Save a PNG of each layer's singular values divided by its largest (log y), one line per layer.

    Uses matplotlib's Agg canvas directly, so it works headless and never touches the global pyplot state.
    Layers with an all-zero update are skipped (log scale); legends are drawn for up to `legend_max` layers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in stats:
        sv = [v for v in s.singular_values if v > 0]
        if sv:
            ax.plot(range(1, len(sv) + 1), [v / sv[0] for v in sv], marker=".", label=s.name)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_title("adapter update spectra (dW = s B A)")
    if 0 < len(ax.lines) <= legend_max:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")

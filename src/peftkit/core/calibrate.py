"""Data statistics for data-driven adapter inits, collected per target layer on the model as it is.

Statistics (an adapter class asks for a subset in `Adapter.calibration`):
  "grad":       G = mean over batches of dL/dW, (out, in_flat) fp32 (LoRA-GA).
  "input_cov":  X^T X / N over every input row x (in,), (in, in) fp32 (activation-aware inits).
  "output_cov": Y^T Y / N over every base output row y (out,), (out, out) fp32 (SaLoRA's safety subspace).
Plus "count": the number of rows (or batches for "grad") seen, as a 0-d tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError, UnsupportedLayerError
from .layers import LayerOps

__all__ = ["Calibration", "STATS", "collect", "default_loss"]

STATS = frozenset({"grad", "input_cov", "output_cov"})


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """model(**batch).loss, as in the training loop (batches carry `labels`)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise DataError("calibration: model(**batch) returned no loss; give batches `labels` or pass loss_fn")
    return loss


@dataclass
class Calibration:
    """Batches for data-driven inits. loss_fn(model, batch) -> scalar runs the model on one batch (default:
    model(**batch).loss); its value is only used for "grad" statistics."""

    batches: Iterable[Mapping[str, Any]]
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], Tensor] = default_loss


def collect(model: nn.Module, layers: Mapping[str, LayerOps], kinds: Iterable[str],
            calibration: Calibration) -> dict[str, dict[str, Tensor]]:
    """{path: {stat: tensor}} for every layer in `layers`, from one pass over the calibration batches."""
    kinds = set(kinds)
    unknown = kinds - STATS
    if unknown:
        raise ConfigError("calibration", f"unknown statistics {sorted(unknown)}; known: {sorted(STATS)}")
    batches = list(calibration.batches)
    if not batches:
        raise DataError("calibration: no batches; pass at least one batch")
    if "grad" in kinds:
        stats = _gradients(model, layers, batches, calibration.loss_fn)
    else:
        stats = {path: {} for path in layers}
    covs = kinds & {"input_cov", "output_cov"}
    if covs:
        for path, extra in _covariances(model, layers, covs, batches, calibration.loss_fn).items():
            stats[path].update(extra)
    return stats


def _gradients(model: nn.Module, layers: Mapping[str, LayerOps], batches: list,
               loss_fn: Callable) -> dict[str, dict[str, Tensor]]:
    """Mean dL/dW of each target weight; every other parameter is frozen meanwhile and restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    grads_before = {p: p.grad for p in flags}
    weights = {path: ops.weight for path, ops in layers.items()}
    try:
        for p in flags:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            loss_fn(model, batch).backward()
        return {path: {"grad": layers[path].to_2d(w.grad).float() / len(batches),  # (out, in_flat)
                       "count": torch.tensor(len(batches))}
                for path, w in weights.items()}
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads_before[p]


def _covariances(model: nn.Module, layers: Mapping[str, LayerOps], kinds: set[str],
                 batches: list, run: Callable) -> dict[str, dict[str, Tensor]]:
    for path, ops in layers.items():
        if not ops.token_wise:
            raise UnsupportedLayerError(f"{path}: activation statistics need a Linear-like layer, not {ops.kind}")
    sums: dict[str, dict[str, Tensor]] = {path: {} for path in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(path: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (N, in)
            y = layers[path].without_bias(output).reshape(-1, output.shape[-1]).float()  # (N, out)
            counts[path] += x.shape[0]
            for kind, rows in (("input_cov", x), ("output_cov", y)):
                if kind in kinds:
                    sums[path][kind] = sums[path].get(kind, 0) + rows.T @ rows  # (d, d)
        return record

    with ExitStack() as stack, torch.no_grad():
        for path, ops in layers.items():
            stack.callback(ops.module.register_forward_hook(hook(path)).remove)
        for batch in batches:
            run(model, batch)
    return {path: {k: v / max(counts[path], 1) for k, v in s.items()} | {"count": torch.tensor(counts[path])}
            for path, s in sums.items()}

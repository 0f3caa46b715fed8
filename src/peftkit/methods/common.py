"""Small helpers shared by the method files (registers no method): config field checks, per-module patterns,
the adapter dtype."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..core.layers import LayerOps
from ..errors import ConfigError

__all__ = ["MAX_RANK", "adapter_dtype", "check_alpha", "check_beta", "check_int", "check_number",
           "check_rank", "pattern_value", "split_chunks", "split_field", "flagged"]

MAX_RANK = 65536


def pattern_value(patterns: dict, name: str, default):
    """peft's rule: a pattern key matches a module name as a regex on a dot-boundary suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_rank(field_name: str, r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise ConfigError(field_name, f"rank must be an integer in [1, {MAX_RANK}], got {r!r}")


def check_alpha(field_name: str, alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(field_name, f"must be a finite number > 0, got {alpha!r}")


def adapter_dtype(ops: LayerOps) -> torch.dtype:
    """Adapters train in fp32 over fp16/bf16 bases (as peft's autocast_adapter_dtype), else in the base dtype."""
    dtype = ops.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_int(field: str, value: Any, low: int, high: int | None = None) -> None:
    """An integer (not bool) in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(field, f"must be an integer {bound}, got {value!r}")


def check_beta(field: str, value: Any) -> None:
    """An EMA rate in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(field, f"must be a number in (0, 1), got {value!r}")


def check_number(field: str, value: Any, low: float = 0.0, high: float = float("inf")) -> None:
    """A finite number in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ConfigError(field, f"must be a number in [{low}, {high}), got {value!r}")


def split_chunks(t: Tensor, sizes: list[int], dim: int) -> nn.ParameterList:
    """`t` split along `dim` into new parameters of `sizes` (which must add up to its size there)."""
    if sum(sizes) != t.shape[dim]:
        raise ConfigError("chunk_pattern", f"chunk sizes {sizes} do not add up to {t.shape[dim]}")
    return nn.ParameterList([nn.Parameter(c.clone()) for c in torch.split(t.detach(), sizes, dim=dim)])


def split_field(per_layer: dict[str, dict[str, Any]], name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-layer fields {path: {field: value}} without `name`, and {path: value of name} where present."""
    rest = {path: {k: v for k, v in fields.items() if k != name} for path, fields in per_layer.items()}
    return rest, {path: fields[name] for path, fields in per_layer.items() if name in fields}


def flagged(value: Tensor | None, like: Tensor) -> tuple[Tensor, bool]:
    """(value, True), or (zeros like `like`, False) for None: an optional tensor in a fixed-shape state."""
    return (like.new_zeros(()), False) if value is None else (value.detach().reshape(like.shape), True)

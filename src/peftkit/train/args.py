"""`TrainArgs`, the loop's hyper-parameters (validated at construction), and the learning-rate schedule.

Kept apart from the loop so recipes and `--help` can read the fields without importing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["SCHEDULES", "TrainArgs", "lr_factor"]

SCHEDULES = ("cosine", "linear", "constant")


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, f"must be a positive integer{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class TrainArgs:
    """Hyper-parameters of `train`. `max_steps` (optimizer steps) overrides `epochs`; `batch_size` is for whoever
    builds the batches; `max_grad_norm=None` turns clipping off; `keep_checkpoints=None` keeps all.
    `calibration_batches`: how many training batches methods that initialize from data (gradients,
    activation statistics) see before training; unused by other methods."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 1
    output_dir: str = "runs/default"
    keep_checkpoints: int | None = 2
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "calibration_batches"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "save_every", "keep_checkpoints"):
            _positive(name, getattr(self, name), optional=True)
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and self.max_grad_norm > 0):
            raise ConfigError("max_grad_norm", f"must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")
        if not str(self.output_dir):
            raise ConfigError("output_dir", "must be a non-empty path")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `total`.

    Warmup: (step + 1) / (warmup + 1), so the first step already moves; then over the remaining steps with
    progress p = (step - warmup) / (total - warmup): cosine 0.5 (1 + cos(pi p)), linear 1 - p, constant 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress if schedule == "linear" else 1.0

"""Shared building blocks for rank-allocating methods (no method is registered here).

- `EmaImportance`: sensitivity x uncertainty smoothing of a score (arXiv 2303.10512, eq. 8-10): for a score s_t
  (per tensor entry, or one number per module)
      I_t = b1 I_{t-1} + (1 - b1) s_t,   U_t = b2 U_{t-1} + (1 - b2) |s_t - I_t|,   importance = I_t * U_t.
- `sensitivity(p)`: s = |w * dL/dw| of a parameter whose gradient is present.
- `cubic_budget`: b(t) = b_0 for t <= t_i, b_T + (b_0 - b_T) (1 - (t - t_i) / (T - t_f - t_i))^3 in between
  (floored), b_T after T - t_f; allocation every `every` steps (the rule of peft's RankAllocator.budget_schedule).
- `linear_schedule`: a value moving linearly from `start` to `end` between t_i and T - t_f.
- `prune_mask`: one global threshold over the scores of all layers (the n-th smallest value; scores <= it drop).
- `top_k`: the indices of the k largest scores (growth), ties broken by position.
- `orthogonality(A, B)`: ||A A^T - I||_F + ||B^T B - I||_F (the SVD-form regularizer, not squared).
- `check_int` / `check_beta` / `check_number`: ConfigError-raising field checks shared by the schedule configs.
- `cubic_allocation`: one step of budgeted pruning over the layers of an adapter (the AdaLoRA schedule as peft runs
  it: importance updates, cubic budget, global threshold, frozen final mask).
- `LayerGroup`: the layers of one adapter injection, kept in `AdapterContext.shared`, with a once-per-step latch
  so the first layer whose `on_step` runs does the cross-layer work for all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["EmaImportance", "sensitivity", "cubic_budget", "linear_schedule", "prune_mask", "top_k", "LayerGroup",
           "orthogonality", "check_int", "check_beta", "check_number", "cubic_allocation"]


class EmaImportance:
    """EMA-smoothed sensitivity (I) and uncertainty (U) per key; `score(key)` = I * U."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.sens: dict[Any, Tensor] = {}
        self.unc: dict[Any, Tensor] = {}

    def update(self, key: Any, s: Tensor) -> None:
        """One step with the fresh score s (any shape, kept per key)."""
        s = s.detach()
        i_prev = self.sens.get(key, torch.zeros_like(s))
        u_prev = self.unc.get(key, torch.zeros_like(s))
        i_new = self.beta1 * i_prev + (1 - self.beta1) * s  # sensitivity smoothing
        self.sens[key] = i_new
        self.unc[key] = self.beta2 * u_prev + (1 - self.beta2) * (s - i_new).abs()  # uncertainty

    def score(self, key: Any) -> Tensor:
        return self.sens[key] * self.unc[key]

    def has(self, key: Any) -> bool:
        return key in self.sens

    def reset(self) -> None:
        self.sens.clear()
        self.unc.clear()


@torch.no_grad()
def sensitivity(p: Tensor) -> Tensor:
    """|w * dL/dw| elementwise (zeros when the parameter has no gradient)."""
    if p.grad is None:
        return torch.zeros_like(p)
    return (p * p.grad).abs().detach()


def cubic_budget(step: int, initial: int, target: int, tinit: int, tfinal: int, total_step: int,
                 every: int = 1) -> tuple[int, bool]:
    """(budget, whether to allocate at this step) of the cubic schedule; allocation happens every `every` steps
    in the decay phase and at every step of the final phase."""
    if step <= tinit:
        return initial, False
    if step > total_step - tfinal:
        return target, True
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((initial - target) * frac ** 3 + target), step % every == 0


def linear_schedule(step: int, start: float, end: float, tinit: int, tfinal: int, total_step: int) -> float:
    """start until t_i, then linear to `end` at T - t_f, `end` afterwards."""
    span = max(total_step - tfinal - tinit, 1)
    frac = min(max((step - tinit) / span, 0.0), 1.0)
    return start + (end - start) * frac


def prune_mask(scores: list[Tensor], n_prune: int) -> list[Tensor]:
    """Boolean keep-masks (one per score tensor) after dropping every entry <= the n_prune-th smallest score over
    all tensors (ties at the threshold drop together). n_prune <= 0 keeps everything."""
    if n_prune <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores])  # (n,)
    threshold = torch.kthvalue(flat.float().cpu(), k=min(n_prune, flat.numel()))[0].item()
    return [s > threshold for s in scores]


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores (stable: on ties the earlier position wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:max(k, 0)])


@torch.no_grad()
def cubic_allocation(layers: list[Any], step: int, target: int, tinit: int, tfinal: int, total_step: int,
                     every: int, state: dict[str, Any]) -> None:
    """peft's `update_and_allocate(step)` over `layers`, each of which provides:
      n_units (int): prunable units it holds; update_importance(): fold the present gradients into its EMAs;
      unit_scores() -> (n_units,); set_keep(mask | None): zero the units outside mask (None: re-apply the last
      mask); importance (an EmaImportance, reset at the end).
    With end = total_step - tfinal: step < end updates importance and, at schedule steps, keeps the b(t) best units
    over all layers (b_0 = the units held at the first call, b_T = target); step == end allocates b_T for good and
    resets importance; step > end re-applies the final masks."""
    end = total_step - tfinal
    if step > end:
        for layer in layers:
            layer.set_keep(None)
        return
    if step < end:
        for layer in layers:
            layer.update_importance()
    initial = state.setdefault("initial_budget", sum(layer.n_units for layer in layers))
    budget, due = cubic_budget(step, initial, target, tinit, tfinal, total_step, every)
    if due or step == end:
        keeps = prune_mask([layer.unit_scores() for layer in layers], initial - budget)
        for layer, keep in zip(layers, keeps, strict=True):
            layer.set_keep(keep)
    if step == end:
        for layer in layers:
            layer.importance.reset()


def orthogonality(a: Tensor, b: Tensor) -> Tensor:
    """||A A^T - I||_F + ||B^T B - I||_F for A (r, in), B (out, r); 0 for r = 0."""
    total = a.sum() * 0
    for cov in (a @ a.T, b.T @ b):  # (r, r)
        if cov.numel():
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
    return total


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


class LayerGroup:
    """The layers of one adapter injection, shared through `AdapterContext.shared[key]`.

    `layers` lists (path, adapter) in model order; `first_at(step)` is True for the first caller of a step only.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[str, Any]] = []
        self.state: dict[str, Any] = {}
        self._last_step: int | None = None

    @classmethod
    def of(cls, shared: dict[str, Any] | None, key: str) -> LayerGroup:
        """The group stored under `key` in `shared` (created on first use; a private one when shared is None)."""
        if shared is None:
            return cls()
        group = shared.get(key)
        if group is None:
            group = shared[key] = cls()
        return group

    def add(self, path: str, layer: Any) -> None:
        self.layers.append((path, layer))

    def first_at(self, step: int) -> bool:
        if self._last_step == step:
            return False
        self._last_step = step
        return True

    def __len__(self) -> int:
        return len(self.layers)

"""Shared building blocks for rank-allocating methods (no method is registered here): importance trackers
(EMA sensitivity x uncertainty of |w * g|, arXiv 2303.10512 eq. 8-10), budget schedules (cubic decay, linear),
a global-threshold selector over all layers of an adapter, top-k growth picks, chunked growing factors, the
SVD-form orthogonality loss, config field checks (from common), and `LayerGroup`: the layers of one adapter
injection kept in `AdapterContext.shared`, with a once-per-step latch so the first layer whose `on_step` runs
does the cross-layer work for all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .common import check_beta, check_int, check_number

__all__ = ["EmaImportance", "sensitivity", "cubic_budget", "linear_schedule", "prune_mask", "top_k", "LayerGroup",
           "orthogonality", "check_int", "check_beta", "check_number", "cubic_allocation",
           "cat_chunks", "recorded_ranks"]


class EmaImportance:
    """Per key, for a score s_t (per entry or per module): I_t = b1 I_{t-1} + (1 - b1) s_t,
    U_t = b2 U_{t-1} + (1 - b2) |s_t - I_t|; `score(key)` = I_t * U_t."""

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

    def state(self, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fixed-shape tensors for a training checkpoint: "ema_I.<key>" and "ema_U.<key>" for every key of `like`
        (key -> a tensor of its score's shape; zeros while untracked) and "ema_tracked" (which keys are tracked)."""
        out = {"ema_tracked": torch.tensor([self.has(key) for key in like])}
        for key, t in like.items():
            out[f"ema_I.{key}"] = self.sens.get(key, torch.zeros_like(t))
            out[f"ema_U.{key}"] = self.unc.get(key, torch.zeros_like(t))
        return out

    def load_state(self, state: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Restore what `state(like)` gave (on the devices of `like`); returns the other entries of `state`."""
        self.reset()
        for key, tracked in zip(like, state["ema_tracked"].tolist(), strict=True):
            if tracked:
                self.sens[key] = state[f"ema_I.{key}"].to(like[key].device)
                self.unc[key] = state[f"ema_U.{key}"].to(like[key].device)
        return {k: t for k, t in state.items() if not k.startswith(("ema_I.", "ema_U.", "ema_tracked"))}


@torch.no_grad()
def sensitivity(p: Tensor) -> Tensor:
    """|w * dL/dw| elementwise (zeros when the parameter has no gradient)."""
    if p.grad is None:
        return torch.zeros_like(p)
    return (p * p.grad).abs().detach()


def cubic_budget(step: int, initial: int, target: int, tinit: int, tfinal: int, total_step: int,
                 every: int = 1) -> tuple[int, bool]:
    """(budget, allocate now?) of peft's RankAllocator.budget_schedule: b_0 for t <= t_i, then
    floor(b_T + (b_0 - b_T) (1 - (t - t_i) / (T - t_f - t_i))^3) allocating every `every` steps, b_T after T - t_f."""
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


def cat_chunks(chunks: Any, dim: int) -> Tensor:
    """The chunks of a growing factor concatenated along `dim`; a single chunk is returned itself (so that loading a
    checkpoint copies into the parameter)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(list(chunks), dim=dim)


def recorded_ranks(pattern: dict[str, int], per_layer: dict[str, dict[str, Any]]) -> dict[str, int]:
    """`pattern` updated with {module path: r} from per-layer fields {path: {"r": r}}."""
    out = dict(pattern)
    for path, fields in per_layer.items():
        if set(fields) != {"r"}:
            raise ConfigError(sorted(fields)[0], "only the per-layer rank 'r' can be recorded")
        out[path] = int(fields["r"])
    return out


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

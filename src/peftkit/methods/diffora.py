"""DiffoRA: LoRA on every candidate module, a DARTS-relaxed selection logit per module learned on validation data,
then a discrete choice of the top-rho modules.

Paper: "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation",
arXiv 2502.08905 (no code located; the relaxation and the bi-level schedule follow DARTS, arXiv 1806.09055).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext, LowRank
from ..core.host import AdaptedLayer
from ..core.layers import LayerOps
from ..core.model import AdapterModel
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, MergeError
from .lora import LoraAdapter, LoraConfig
from .rank_budget import top_k

__all__ = ["DifforaConfig", "DifforaAdapter", "diffora_layers", "theta_parameters", "weight_parameters",
           "theta_optimizer", "architecture_step", "discretize"]

PLAIN_INITS = (True, False, "gaussian")


@register_config
@dataclass(frozen=True, kw_only=True)
class DifforaConfig(LoraConfig):
    """LoRA fields plus diffora_keep_ratio: rho in (0, 1], the fraction of modules `discretize` keeps
    (peft_type "DIFFORA"; peft has no such method)."""

    peft_type: ClassVar[str] = "DIFFORA"
    method_name: ClassVar[str] = "diffora"

    diffora_keep_ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(name, "is not supported by DiffoRA (it selects plain LoRA modules); set it to False")
        if self.init_lora_weights not in PLAIN_INITS or not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError("init_lora_weights", f"DiffoRA keeps the base weight; use one of {PLAIN_INITS}, "
                                                   f"got {self.init_lora_weights!r}")
        rho = self.diffora_keep_ratio
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise ConfigError("diffora_keep_ratio", f"must be a number in (0, 1], got {rho!r}")

    def for_original_base(self) -> DifforaConfig:
        return self


@register_adapter("diffora", DifforaConfig)
class DifforaAdapter(LoraAdapter):
    """DiffoRA (arXiv 2502.08905): y = W x + b + w * s * B A drop(x), s as LoRA's.

    Search phase: w = softmax(theta)[0], theta = (theta_on, theta_off) the DARTS two-way relaxation over {LoRA,
    zero}, theta = 0 at init (w = 1/2). theta trains at learning rate 0 in the weight step (lr_scale) and moves only
    in `architecture_step`, from a validation loss. After `discretize`: w = 1 for the kept modules and w = 0 (no
    computation) for the others; the persistent buffers diffora_discrete / diffora_selected record it.
    Merge: W' = W + w s B A (exact). Identity at init (B = 0).
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    lr_scale: ClassVar[dict[str, float]] = {"diffora_theta": 0.0}

    def __init__(self, ops: LayerOps, config: DifforaConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        dtype, device = self.lora_A.dtype, self.lora_A.device
        self.diffora_theta = nn.Parameter(torch.zeros(2, dtype=dtype, device=device))  # (2,): logits (on, off)
        self.register_buffer("diffora_discrete", torch.zeros(1, dtype=dtype, device=device))  # 1 after discretize
        self.register_buffer("diffora_selected", torch.ones(1, dtype=dtype, device=device))  # 1 kept, 0 dropped
        self.after_load()

    def after_load(self) -> None:
        """Mirror the saved selection in Python, read every forward without a device sync."""
        self.discrete = bool(self.diffora_discrete.item())
        self.dropped = self.discrete and not bool(self.diffora_selected.item())

    def selection_weight(self) -> Tensor:
        """w: softmax(theta)[0] while searching (differentiable in theta), the 0/1 selection after discretize."""
        return self.diffora_selected[0] if self.discrete else torch.softmax(self.diffora_theta, dim=0)[0]

    def project(self, x: Tensor) -> Tensor:
        return super().project(x) * self.selection_weight()  # (..., r): w s A x

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return y if self.dropped else super().add_to(y, x, z)

    def delta_weight(self) -> Tensor:
        return float(self.selection_weight().detach()) * super().delta_weight()  # (out, in_flat)

    def lowered(self) -> LowRank:
        return LowRank(self.lora_A, self.lora_B, self.scaling * float(self.selection_weight().detach()))

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {n: n for n in ("diffora_theta", "diffora_discrete", "diffora_selected")}


def diffora_layers(model: AdapterModel, name: str = "default") -> list[tuple[str, DifforaAdapter]]:
    """(path, adapter) of DiffoRA adapter `name`, in model order."""
    model._check_names([name])
    layers = [(p, h.adapters[name]) for p, h in model.hosts() if isinstance(h, AdaptedLayer) and name in h.adapters]
    if not layers or not all(isinstance(a, DifforaAdapter) for _, a in layers):
        raise ConfigError("name", f"adapter {name!r} is a {model.configs[name].method!r} adapter, not DiffoRA")
    return layers


def theta_parameters(model: AdapterModel, name: str = "default") -> list[nn.Parameter]:
    """The selection logits of adapter `name` (the architecture parameters)."""
    return [a.diffora_theta for _, a in diffora_layers(model, name)]


def weight_parameters(model: AdapterModel, name: str = "default") -> list[nn.Parameter]:
    """Every parameter of adapter `name` except the selection logits (for a hand-written weight optimizer)."""
    thetas = {id(p) for p in theta_parameters(model, name)}
    return [p for _, a in diffora_layers(model, name) for p in a.parameters() if id(p) not in thetas]


def theta_optimizer(model: AdapterModel, name: str = "default", lr: float = 3e-4,
                    weight_decay: float = 1e-3) -> torch.optim.Optimizer:
    """Adam over the logits only, with the DARTS architecture settings (betas (0.5, 0.999))."""
    return torch.optim.Adam(theta_parameters(model, name), lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)


def architecture_step(model: AdapterModel, val_loss: Tensor, optimizer: torch.optim.Optimizer,
                      name: str = "default") -> None:
    """One first-order DARTS step: theta <- optimizer step on dL_val/dtheta. The gradient is taken with
    torch.autograd.grad, so the weights' .grad (the training loss's) is neither read nor changed."""
    thetas = theta_parameters(model, name)
    ids = {id(p) for p in thetas}
    if any(id(p) not in ids for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError("optimizer", "must hold only the selection logits; build it with theta_optimizer(model)")
    grads = torch.autograd.grad(val_loss, thetas, allow_unused=True)
    for p, g in zip(thetas, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g
    optimizer.step()
    for p in thetas:
        p.grad = None


@torch.no_grad()
def discretize(model: AdapterModel, name: str = "default", keep_ratio: float | None = None) -> list[str]:
    """Keep the round(rho * L) modules (at least 1) with the largest softmax(theta)[0]; the others stop contributing.
    Returns the kept paths. Refused while the adapter is merged, and when it was already discretized."""
    layers = diffora_layers(model, name)
    config = model.configs[name]
    rho = config.diffora_keep_ratio if keep_ratio is None else keep_ratio
    config.replace(diffora_keep_ratio=rho)  # validates rho, naming the field
    if any(name in h.merged for _, h in model.hosts() if isinstance(h, AdaptedLayer)):
        raise MergeError(f"adapter {name!r} is merged; unmerge before discretize")
    if any(a.discrete for _, a in layers):
        raise ConfigError("name", f"adapter {name!r} is already discretized")
    scores = [float(torch.softmax(a.diffora_theta.float(), dim=0)[0]) for _, a in layers]
    keep = set(top_k(scores, max(1, round(rho * len(layers)))))
    for i, (_, adapter) in enumerate(layers):
        adapter.diffora_discrete.fill_(1)
        adapter.diffora_selected.fill_(1 if i in keep else 0)
        adapter.after_load()
    return [path for i, (path, _) in enumerate(layers) if i in keep]

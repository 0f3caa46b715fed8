"""AdapterModel: peftkit's own API over a wrapped model (the peft facade in `compat` builds on it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterNameError, ConfigError, MergeError, NonFiniteWeightError
from . import inject
from .adapter import Adapter
from .calibrate import Calibration, collect
from .config import AdapterConfig
from .host import BASE, AdaptedLayer, ModulesToSave, Routing
from .registry import get_method

__all__ = ["AdapterModel", "ParamReport"]


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {pct:.4f}"


class AdapterModel(nn.Module):
    """A model with named adapters. The base stays frozen; adapters train, merge, combine and switch.

    Which adapters run (`active`) and which train (`trainable`) are independent sets.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.active: tuple[str, ...] = ()
        self.trainable: tuple[str, ...] = ()
        self.routing = Routing()
        self._bias_originals: dict[str, torch.Tensor] = {}
        self._input_transforms: list[tuple[str, AdaptedLayer]] = []  # active adapters rewriting the model's inputs
        model.requires_grad_(False)

    # --- structure ------------------------------------------------------------------------------------------
    def hosts(self) -> Iterator[tuple[str, AdaptedLayer | ModulesToSave]]:
        for path, module in inject.walk(self.model):
            if isinstance(module, (AdaptedLayer, ModulesToSave)):
                yield path, module

    def add_adapter(self, name: str, config: AdapterConfig, *, active: bool | None = None,
                    trainable: bool | None = None, calibration: Calibration | None = None) -> list[str]:
        """Inject `config` as adapter `name`; returns the adapted module paths. Fails without changes.
        The first adapter is active and trainable by default; later ones are neither until asked.
        calibration: batches for methods that initialize from data (their `calibration` statistics)."""
        p = self.plan_adapter(name, config, calibration=calibration)
        self.commit_adapter(p, active=active, trainable=trainable)
        return list(p.adapters)

    def plan_adapter(self, name: str, config: AdapterConfig, initialize: bool = True,
                     calibration: Calibration | None = None) -> inject.Plan:
        """Build adapter `name` without changing the model (see commit_adapter)."""
        if name in self.configs:
            raise AdapterNameError(f"adapter {name!r} already exists; delete it or choose another name")
        p = inject.plan(self.model, config, name, self.routing, initialize=initialize)
        kinds = get_method(config.method).adapter_cls.calibration
        if initialize and kinds:
            if calibration is None:
                raise ConfigError("calibration", f"method {config.method!r} initializes from data; pass "
                                  "calibration=Calibration(batches) to add_adapter")
            stats = collect(self.model, {path: a.ops for path, a in p.adapters.items()}, kinds, calibration)
            for path, adapter in p.adapters.items():
                adapter.calibrate(stats[path])
        return p

    def commit_adapter(self, p: inject.Plan, *, active: bool | None = None, trainable: bool | None = None) -> None:
        first = not self.configs
        p.commit()
        self.configs[p.name] = p.config
        self._apply_bias_mode(p.config, list(p.adapters))
        if first if active is None else active:
            self.set_active(*self.active, p.name)
        else:
            self.set_active(*self.active)
        make_trainable = first if trainable is None else trainable
        self.set_trainable(*self.trainable, *([p.name] if make_trainable else []))

    def delete_adapter(self, name: str) -> None:
        self._check_names([name])
        inject.remove(self.model, name)
        del self.configs[name]
        self.active = tuple(n for n in self.active if n != name)
        self.set_active(*self.active)
        self.set_trainable(*(n for n in self.trainable if n != name))

    def _check_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.configs:
                raise AdapterNameError(f"unknown adapter {name!r}; existing adapters: {sorted(self.configs)}")

    def current_config(self, name: str) -> AdapterConfig:
        """Adapter `name`'s config with the per-layer values its layers changed during training (pruned or grown
        ranks, selected blocks): what `save_adapter` writes, so that loading allocates the current shapes."""
        self._check_names([name])
        per_layer = {path: fields for path, host in self.hosts() if isinstance(host, AdaptedLayer)
                     and name in host.adapters and (fields := host.adapters[name].layer_fields())}
        config = self.configs[name]
        return config.with_layer_fields(per_layer) if per_layer else config

    # --- activation and training ----------------------------------------------------------------------------
    def set_active(self, *names: str) -> None:
        """Adapters whose outputs are added in forward (in this order)."""
        self._check_names(names)
        self.active = tuple(dict.fromkeys(names))
        self._input_transforms = []
        for _, host in self.hosts():
            if isinstance(host, AdaptedLayer):
                host.active = tuple(n for n in self.active if n in host.adapters)
                self._input_transforms += [(n, host) for n in host.active if host.adapters[n].transforms_inputs]
            else:
                host.active = next((n for n in self.active if n in host.copies), None)

    def set_trainable(self, *names: str) -> None:
        """Exactly these adapters' tensors (and their module copies) receive gradients."""
        self._check_names(names)
        self.trainable = tuple(dict.fromkeys(names))
        for _, host in self.hosts():
            parts = host.adapters if isinstance(host, AdaptedLayer) else host.copies
            for name, part in parts.items():
                part.requires_grad_(name in self.trainable)

    def bias_names(self, config: AdapterConfig, adapted: Iterable[str], saved: Iterable[str] = ()) -> list[str]:
        """The biases `config.bias` trains for an adapter on the `adapted` paths, named as after injection
        (`<path>.base_layer.bias` on adapted layers). Biases inside `saved` module copies are never included."""
        adapted, saved = set(adapted), tuple(saved) + tuple(p for p, h in self.hosts() if isinstance(h, ModulesToSave))
        out = []
        for name, _ in self.model.named_parameters():
            if config.bias == "none" or not name.endswith(".bias") or ".adapters." in name:
                continue
            owner = name.removesuffix(".bias").removesuffix(".base_layer")
            if any(owner == s or owner.startswith(s + ".") for s in saved):
                continue
            if config.bias == "all" or owner in adapted:
                out.append(f"{owner}.base_layer.bias" if owner in adapted else name)
        return out

    def _apply_bias_mode(self, config: AdapterConfig, paths: list[str]) -> None:
        for name in self.bias_names(config, paths):
            p = self.model.get_parameter(name)
            self._bias_originals.setdefault(name, p.detach().clone())
            p.requires_grad_(True)

    @contextmanager
    def disabled(self):
        """Run the plain base model: adapters off, merges undone, trained biases swapped for the originals."""
        merged = {path: list(h.merged) for path, h in self.hosts() if isinstance(h, AdaptedLayer)}
        self.unmerge()
        params = dict(self.model.named_parameters())
        swapped = {n: params[n].detach().clone() for n in self._bias_originals}
        self._copy_params(params, self._bias_originals)
        for _, host in self.hosts():
            host.disabled = True
        try:
            yield self
        finally:
            for _, host in self.hosts():
                host.disabled = False
            self._copy_params(params, swapped)
            for path, names in merged.items():
                self.model.get_submodule(path).merge(names)

    @staticmethod
    def _copy_params(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)

    @contextmanager
    def routed(self, adapter_names: Sequence[str]):
        """Per-row adapters for one forward: row i uses adapter_names[i] ("__base__" = no adapter)."""
        self._check_names(n for n in set(adapter_names) if n != BASE)
        self.routing.rows = tuple(adapter_names)
        try:
            yield self
        finally:
            self.routing.rows = None

    # --- merging --------------------------------------------------------------------------------------------
    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights. Every layer is checked first, so a
        refused merge (MergeError; NonFiniteWeightError with safe=True) changes nothing."""
        names = list(self.active if names is None else names)
        self._check_names(names)
        layers = [(path, h) for path, h in self.hosts() if isinstance(h, AdaptedLayer)]
        for path, h in layers:
            live = h.check_merge(names, path)
            if safe and live and not torch.isfinite(h.merge_result(live)[0]).all():
                raise NonFiniteWeightError(f"merging {live} into {path} gives NaN/Inf; nothing was merged")
        for _, h in layers:
            h.merge(names)

    def unmerge(self) -> None:
        for _, host in self.hosts():
            if isinstance(host, AdaptedLayer):
                host.unmerge()

    def merge_and_unload(self, safe: bool = False) -> nn.Module:
        self.merge(safe=safe)
        return self._release(merge=True)

    def unload(self) -> nn.Module:
        self._copy_params(dict(self.model.named_parameters()), self._bias_originals)
        return self._release(merge=False)

    def _release(self, merge: bool) -> nn.Module:
        model = inject.unload(self.model, merge=merge)
        self.configs.clear()
        self.active = self.trainable = ()
        return model

    # --- training hooks (the loop calls these; it never names a method) ----------------------------------------
    def _trained_adapters(self) -> Iterator[tuple[str, str, nn.Module]]:
        for path, host in self.hosts():
            if isinstance(host, AdaptedLayer):
                for name in self.trainable:
                    if name in host.adapters:
                        yield path, name, host.adapters[name]

    def lr_multipliers(self) -> dict[int, float]:
        """{id(parameter): learning-rate multiplier} for trained parameters whose method asks for one (`lr_scale`,
        e.g. a vector bank and its logits at different rates); parameters not listed train at the base rate."""
        out: dict[int, float] = {}
        for _, _, adapter in self._trained_adapters():
            for attr, multiplier in adapter.lr_scale.items():
                param = getattr(adapter, attr, None)
                if isinstance(param, nn.Parameter):
                    out[id(param)] = multiplier
        return out

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Every trainable adapter's named regularizers, summed per name across layers."""
        out: dict[str, torch.Tensor] = {}
        for _, _, adapter in self._trained_adapters():
            _add_named(out, adapter.extra_losses())
        return out

    def pre_step_hook(self, step: int) -> None:
        """After backward, before optimizer step `step`: every trained adapter's `before_optimizer_step` (gradient
        masks, gradient sparsification)."""
        for _, _, adapter in self._trained_adapters():
            adapter.before_optimizer_step(step)

    def step_hook(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """After optimizer step `step` (gradients still present): every trained adapter's `on_step`. The optimizer
        state of parameters an adapter re-initialized is dropped; parameters an adapter added (rank growth) join
        the optimizer and removed ones leave it. Returns True when the set of trainable parameters changed."""
        for _, _, adapter in self._trained_adapters():
            for p in adapter.on_step(step) or ():
                if optimizer is not None:
                    optimizer.state.pop(p, None)
        if optimizer is None:
            return False
        return _sync_optimizer(optimizer, [p for p in self.parameters() if p.requires_grad], self.lr_multipliers)

    def has_output_losses(self) -> bool:
        """Whether a trained adapter's method defines regularizers on the model output."""
        classes = (get_method(self.configs[n].method).adapter_cls for n in self.trainable)
        return any(cls.output_losses.__func__ is not Adapter.output_losses.__func__ for cls in classes)

    def needs_reference_output(self) -> bool:
        return any(get_method(self.configs[n].method).adapter_cls.needs_reference_output for n in self.trainable)

    def output_losses(self, logits: torch.Tensor,
                      reference: Callable[[], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Regularizers of trained adapters on the model output `logits`; `reference()` gives the base model's
        output for the same batch and is called once, only if a method needs it."""
        ref = None
        if self.needs_reference_output():
            if reference is None:
                raise ConfigError("reference", "a trained method regularizes against the base model's output; "
                                  "pass reference=lambda: <base logits for this batch>")
            ref = reference().detach()
        out: dict[str, torch.Tensor] = {}
        for name in self.trainable:
            config = self.configs[name]
            _add_named(out, get_method(config.method).adapter_cls.output_losses(config, logits, ref))
        return out

    # --- reporting ------------------------------------------------------------------------------------------
    def param_report(self) -> ParamReport:
        total = trainable = 0
        seen: set[int] = set()
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return ParamReport(trainable, total)

    def forward(self, *args, **kwargs):
        return self.model(*args, **self.transformed_inputs(kwargs))

    def transformed_inputs(self, kwargs: dict) -> dict:
        """The model's keyword arguments after active input-rewriting adapters (soft prompts) ran."""
        for name, host in self._input_transforms:
            if host.disabled:
                continue
            if self.routing.rows is not None:
                raise MergeError(f"adapter {name!r} rewrites the model inputs (soft prompts) and cannot be mixed "
                                 "per row with adapter_names=; run its rows in a batch of their own")
            kwargs = host.adapters[name].transform_inputs(kwargs)
        return kwargs


def _add_named(out: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
    """Sum named loss terms into `out` by name."""
    for key, value in terms.items():
        out[key] = out[key] + value if key in out else value


def _sync_optimizer(optimizer: torch.optim.Optimizer, live: list[nn.Parameter],
                    multipliers: Callable[[], dict[int, float]]) -> bool:
    """Make the optimizer hold exactly `live` (in model order): parameters that no longer train leave with their
    state; new ones join the group of their learning-rate multiplier (relative to the first, base-rate group, as
    the training loop builds them). Each group keeps model order, so an optimizer built afresh from the changed
    model (a resumed run) lines up with this one. Returns True when anything changed."""
    live_ids = {id(p) for p in live}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    if held_ids == live_ids:
        return False
    for p in held:
        if id(p) not in live_ids:
            optimizer.state.pop(p, None)
    groups = optimizer.param_groups
    rate = [g.get("initial_lr", g["lr"]) for g in groups]  # (groups,)
    member = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    scale = multipliers()  # {id(param): multiplier}, only computed when something changed
    for p in live:
        if id(p) not in member:
            want = rate[0] * scale.get(id(p), 1.0)
            member[id(p)] = next((i for i, r in enumerate(rate) if math.isclose(r, want)), 0)
    for i, group in enumerate(groups):
        group["params"] = [p for p in live if member[id(p)] == i]
    return True

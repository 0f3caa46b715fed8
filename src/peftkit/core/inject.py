"""Model surgery: one generic, name-based, reversible function pair.

`plan(model, config, name)` builds every adapter without touching the model (so a failure changes nothing);
`Plan.commit()` swaps hosts in. `remove(model, name)` and `unload(model, merge=)` undo it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..errors import AdapterNameError, NoTargetMatchedError
from ..models.presets import default_target_modules
from .adapter import Adapter, AdapterContext
from .config import AdapterConfig
from .host import AdaptedLayer, ModulesToSave, Routing
from .layers import is_linear_like, ops_for
from .registry import get_method

__all__ = ["Plan", "plan", "walk", "find_targets", "remove", "unload", "check_adapter_name"]

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith("__"):
        raise AdapterNameError(
            f"adapter name {name!r} is invalid; use letters, digits, '_' or '-' (no dots, slashes, leading '__')")


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that treats hosts and module copies as leaves (their insides are not targets)."""
    for child_name, child in module.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        yield path, child
        if not isinstance(child, (AdaptedLayer, ModulesToSave)):
            yield from walk(child, path)


def _matches(name: str, spec: tuple[str, ...] | str | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index_ok(name: str, config: AdapterConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or ("[^.]*",)
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)  # the first index after the pattern, as peft
        if m:
            return int(m.group(1)) in config.layers_to_transform
    return False


def _excluded(name: str, config: AdapterConfig) -> bool:
    """exclude_modules, and anything inside a module that gets a trainable copy (modules_to_save)."""
    saved = config.modules_to_save or ()
    inside_saved = any(name == m or name.endswith("." + m) or f".{m}." in f".{name}" for m in saved)
    return inside_saved or _matches(name, config.exclude_modules)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def _resolved_targets(model: nn.Module, config: AdapterConfig):
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return default_target_modules(model_type or type(model).__name__)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules `config` selects, in model order."""
    spec = _resolved_targets(model, config)
    heads = _output_head_names(model) if spec == "all-linear" else set()
    out = []
    for name, module in walk(model):
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if spec == "all-linear":
            hit = is_linear_like(base) and name not in heads
        else:
            hit = _matches(name, spec)
        if hit and not _excluded(name, config) and _layer_index_ok(name, config):
            out.append(name)
    return out


def _no_match_error(model: nn.Module, config: AdapterConfig) -> NoTargetMatchedError:
    leaves = [n for n, m in walk(model) if hasattr(m, "weight")][:8]
    return NoTargetMatchedError(
        f"target_modules={_resolved_targets(model, config)!r} (exclude_modules={config.exclude_modules!r}, "
        f"layers_to_transform={config.layers_to_transform!r}) matched no module. Module names that exist "
        f"include: {leaves}. Use exact names, dot-suffixes, a regex string, or 'all-linear'")


def _get(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, child, getattr(parent, child)


@dataclass
class Plan:
    """Adapters built for one injection, not yet in the model."""

    model: nn.Module
    name: str
    config: AdapterConfig
    routing: Routing
    adapters: dict[str, Adapter] = field(default_factory=dict)
    saved_modules: list[str] = field(default_factory=list)

    def commit(self) -> None:
        for path, adapter in self.adapters.items():
            parent, child, module = _get(self.model, path)
            if not isinstance(module, AdaptedLayer):
                module = AdaptedLayer(module, adapter.ops, self.routing).train(module.training)
                setattr(parent, child, module)
            module.add(self.name, adapter)
        for path in self.saved_modules:
            parent, child, module = _get(self.model, path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, self.routing).train(module.training)
                setattr(parent, child, module)
            module.add(self.name)


def plan(model: nn.Module, config: AdapterConfig, name: str, routing: Routing, initialize: bool = True) -> Plan:
    """Build the adapters for `config` under `name`; raises before any change to `model`."""
    check_adapter_name(name)
    spec = get_method(config.method)
    targets = find_targets(model, config)
    if not targets:
        raise _no_match_error(model, config)
    result = Plan(model, name, config, routing)
    built = config.for_model(getattr(getattr(model, "config", None), "model_type", None))
    shared: dict = {}
    for path in targets:
        module = model.get_submodule(path)
        if isinstance(module, AdaptedLayer):
            if name in module.adapters:
                raise AdapterNameError(f"adapter {name!r} already exists on {path}; pick another name or delete it")
            ops = module.ops
        else:
            ops = ops_for(module, path)
        ctx = AdapterContext(path, tuple(targets), shared)
        result.adapters[path] = spec.adapter_cls(ops, built.for_module(path), initialize=initialize, ctx=ctx)
    result.saved_modules = _saved_module_paths(model, config)
    return result


def _saved_module_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    found = [n for n, _ in walk(model) if _matches(n, config.modules_to_save)]
    if not found:
        raise NoTargetMatchedError(f"modules_to_save={list(config.modules_to_save)} matched no module")
    return found


def remove(model: nn.Module, name: str) -> None:
    """Delete adapter `name` everywhere; hosts left empty give their base layer back."""
    for path, module in list(walk(model)):
        if isinstance(module, AdaptedLayer) and name in module.adapters:
            module.remove(name)
            if not module.adapters:
                _replace(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave) and name in module.copies:
            module.remove(name)
            if not module.copies:
                _replace(model, path, module.original_module)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child, _ = _get(model, path)
    setattr(parent, child, new)


def unload(model: nn.Module, merge: bool) -> nn.Module:
    """Remove every host; with merge=True fold the active adapters (and active module copies) in first."""
    for path, module in list(walk(model)):
        if isinstance(module, AdaptedLayer):
            if merge:
                module.merge(module.active)
            else:
                module.unmerge()
            for name in [n for n in module.adapters if n not in module.merged]:
                module.remove(name)  # restores base changes made by inits of unmerged adapters
            _replace(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave):
            keep = module.copies[module.active] if merge and module.active in module.copies else None
            _replace(model, path, keep if keep is not None else module.original_module)
    return model

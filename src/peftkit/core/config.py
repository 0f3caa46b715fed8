"""The config base every method config extends: which modules to adapt, validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .registry import check_selected, selected_method

__all__ = ["AdapterConfig", "BIAS_MODES"]

BIAS_MODES = ("none", "all", "lora_only")


def _as_tuple(field: str, value: Any, item_type: type) -> tuple | None:
    """Normalise a list/tuple/single value to a tuple of `item_type`, or raise ConfigError."""
    if value is None:
        return None
    items = (value,) if isinstance(value, item_type) else tuple(value)
    for item in items:
        if not isinstance(item, item_type) or isinstance(item, bool):
            raise ConfigError(field, f"expected {item_type.__name__} entries, got {item!r}")
    return items


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields shared by every method: where to adapt and what else trains.

    target_modules: list = exact module name or dot-boundary suffix; str = `re.fullmatch` on the full name;
        "all-linear" = every Linear/Conv1D but the output head; None = the architecture preset.
    exclude_modules: same matching rules; matched names are never adapted.
    layers_to_transform / layers_pattern: only adapt modules whose layer index (the number after
        `<layers_pattern>.` in the name) is listed.
    modules_to_save: whole modules that get a trainable copy per adapter (e.g. a classifier head).
    bias: "none" | "all" (every bias trains) | "lora_only" (biases of adapted layers train).
    """

    peft_type: ClassVar[str] = ""
    method_name: ClassVar[str] = ""

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    bias: str = "none"
    task_type: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                self._set(name, _as_tuple(name, value, str))
        self._set("layers_to_transform", _as_tuple("layers_to_transform", self.layers_to_transform, int))
        self._set("layers_pattern", _as_tuple("layers_pattern", self.layers_pattern, str))
        self._set("modules_to_save", _as_tuple("modules_to_save", self.modules_to_save, str))
        if self.bias not in BIAS_MODES:
            raise ConfigError("bias", f"must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.target_modules == ():
            raise ConfigError("target_modules", "is empty; list module names, a regex, or 'all-linear'")
        self.validate()
        check_selected(self)  # the selected method's own checks; fields selecting several methods are refused

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError naming the field."""

    @property
    def method(self) -> str:
        """The registered method this config builds: a config class may serve several, told apart by the
        registry's `selects` predicates (see core.registry.selected_method)."""
        return selected_method(self)

    def for_model(self, model_type: str | None) -> AdapterConfig:
        """This config with defaults that depend on the architecture filled in (transformers `model_type`, None for
        other modules); injection builds adapters from it. Most methods have none."""
        return self

    def for_module(self, name: str) -> AdapterConfig:
        """The config that applies to the module at `name` (per-module overrides such as rank_pattern)."""
        return self

    def for_original_base(self) -> AdapterConfig:
        """The config of this adapter re-expressed against the base weights before a base-mutating init."""
        return self

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> AdapterConfig:
        """This config with per-layer values {module path: {field: value}} recorded (e.g. ranks after pruning),
        so that `for_module(path)` returns them. Configs without per-layer fields refuse."""
        fields = sorted({k for v in per_layer.values() for k in v})
        raise ConfigError(fields[0] if fields else "config",
                          f"{type(self).__name__} cannot record per-layer values of {fields}")

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a plain dict; unknown keys raise ConfigError naming them and the valid fields."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(unknown[0], f"unknown field(s) {unknown} for {cls.__name__}; "
                                          f"valid fields: {cls.field_names()}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

"""The method registry: config classes by PEFT type, adapter classes by method name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError, UnknownMethodError

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import AdapterConfig

__all__ = ["MethodSpec", "register_adapter", "register_config", "get_method", "method_names", "config_for_peft_type",
           "check_selected", "selected_method"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adapter_cls: type[Adapter]
    config_cls: type[AdapterConfig]
    summary: str
    config_defaults: dict = field(default_factory=dict)
    selects: Callable[[AdapterConfig], bool] | None = None

    def make_config(self, **fields) -> AdapterConfig:
        """A config that selects this method (config_defaults carry e.g. the flag that picks it), from fields."""
        return self.config_cls.from_dict(self.config_defaults | fields)


_ADAPTERS: dict[str, MethodSpec] = {}
_CONFIGS_BY_PEFT_TYPE: dict[str, type[AdapterConfig]] = {}


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config class loadable from its PEFT `peft_type`."""
    _CONFIGS_BY_PEFT_TYPE[cls.peft_type] = cls
    return cls


def register_adapter(name: str, config_cls: type[AdapterConfig], config_defaults: dict | None = None,
                     selects: Callable[[AdapterConfig], bool] | None = None):
    """Class decorator: register an adapter class under a method name. When the config class serves several
    methods (peft's LoraConfig(use_dora=True)), `selects(config)` says whether a config picks this one and
    `config_defaults` are the fields that make a config that does."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        if name in _ADAPTERS:
            raise ValueError(f"method {name!r} is registered twice")
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
        _ADAPTERS[name] = MethodSpec(name, cls, config_cls, summary, dict(config_defaults or {}), selects)
        cls.method_name = name
        return cls

    return deco


def _selecting(config: AdapterConfig) -> list[MethodSpec]:
    return [s for s in _ADAPTERS.values() if type(config) is s.config_cls and s.selects and s.selects(config)]


def check_selected(config: AdapterConfig) -> None:
    """Run `check_config` of every method the config's fields select (each names the field it refuses), then
    of the method it builds."""
    specs = _selecting(config)
    for spec in specs:
        spec.adapter_cls.check_config(config)
    method = selected_method(config)
    if not specs and method in _ADAPTERS:
        _ADAPTERS[method].adapter_cls.check_config(config)


def selected_method(config: AdapterConfig) -> str:
    """The method a config builds: the one registered for its class whose `selects` accepts it, else the class's
    own `method_name`; ConfigError when its fields select several."""
    hits = [s.name for s in _selecting(config)]
    if len(hits) > 1:
        raise ConfigError("method", f"the fields of this {type(config).__name__} select several methods {hits}; "
                                    "keep the fields of one")
    return hits[0] if hits else config.method_name


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method, or UnknownMethodError listing the known ones."""
    if name not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS))
        raise UnknownMethodError("method", f"unknown method {name!r}; registered methods: {known}")
    return _ADAPTERS[name]


def method_names() -> list[str]:
    return sorted(_ADAPTERS)


def config_for_peft_type(peft_type: str) -> type[AdapterConfig]:
    if peft_type not in _CONFIGS_BY_PEFT_TYPE:
        known = ", ".join(sorted(_CONFIGS_BY_PEFT_TYPE))
        raise UnknownMethodError("peft_type", f"unsupported peft_type {peft_type!r}; supported: {known}")
    return _CONFIGS_BY_PEFT_TYPE[peft_type]

"""adapter_config.json <-> config objects, with peft's field names and peft_type."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from ..core.config import AdapterConfig
from ..core.registry import config_for_peft_type
from ..errors import PeftkitError

__all__ = ["config_to_json", "config_from_json", "PeftkitWarning"]


class PeftkitWarning(UserWarning):
    """Something was accepted but ignored (for example an unknown config key)."""


# Keys peft writes that carry no information for peftkit (bookkeeping, or inert when falsy).
_BOOKKEEPING = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                "peft_version", "peftkit_version", "megatron_core", "qalora_group_size"}


def config_to_json(config: AdapterConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The dict written to adapter_config.json; peft reads it back as the same config."""
    data = {"peft_type": config.peft_type, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True}
    data.update(config.to_dict())
    return data


def config_from_json(data: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
    """Build the config; unknown keys are ignored with a PeftkitWarning when they would change behaviour."""
    if not isinstance(data, dict) or "peft_type" not in data:
        raise PeftkitError(f"{source}: not an adapter config (no 'peft_type' key)")
    cls = config_for_peft_type(data["peft_type"])
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs, ignored = {}, []
    for key, value in data.items():
        if key in fields:
            kwargs[key] = value
        elif key not in _BOOKKEEPING and value not in (None, False, {}, [], ""):
            ignored.append(key)
    if ignored:
        warnings.warn(f"{source}: keys {sorted(ignored)} are not supported by peftkit {cls.__name__} and were "
                      "ignored; the adapter may behave differently than in the tool that wrote it",
                      PeftkitWarning, stacklevel=3)
    return cls(**kwargs)

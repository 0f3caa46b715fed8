"""The PEFT on-disk format (adapter_config.json + adapter_model.safetensors): the only place that knows it."""

from .config_json import config_from_json, config_to_json
from .peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state,
    load_adapter,
    read_adapter,
    restore_adapter_state,
    save_adapter,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_state", "config_from_json", "config_to_json", "load_adapter",
           "read_adapter", "restore_adapter_state", "save_adapter"]

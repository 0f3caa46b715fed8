"""peftkit: parameter-efficient fine-tuning for PyTorch and Hugging Face models.

Native API: `AdapterModel`, method configs, `save_adapter` / `load_adapter`.
peft-compatible facade: `LoraConfig`, `get_peft_model`, `PeftModel`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import (
    errors,
    methods,  # noqa: F401  (registers every method)
)
from .checkpoint import load_adapter, read_adapter, save_adapter
from .compat import PeftModel, get_peft_model
from .core.calibrate import Calibration
from .core.config import AdapterConfig
from .core.model import AdapterModel
from .core.registry import get_method, method_names
from .errors import *  # noqa: F403  (every named error type; listed in errors.__all__)
from .methods.lora import LoraConfig

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterModel",
    "Calibration",
    "LoraConfig",
    "PeftModel",
    "get_peft_model",
    "get_method",
    "method_names",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    *errors.__all__,
]

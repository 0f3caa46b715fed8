"""Serving many adapters on one base model: batched adapter ops, a lazy store, a byte-budget cache, an engine.

Importing this package pulls in torch and transformers but never the HTTP stack (`serve.server` imports fastapi
on its own). `import peftkit` does not import this package.
"""

from __future__ import annotations

from .cache import AdapterCache
from .engine import Engine
from .model import ServingModel
from .ops import BACKENDS, RoutingPlan, Slots, adapter_op
from .store import AdapterStore, check_serving_name
from .types import GenerationRequest, TokenEvent

__all__ = ["AdapterCache", "AdapterStore", "BACKENDS", "Engine", "GenerationRequest", "RoutingPlan", "ServingModel",
           "Slots", "TokenEvent", "adapter_op", "check_serving_name"]

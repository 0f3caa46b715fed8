"""Serving many adapters on one base model: batched adapter ops, a lazy store, a byte-budget cache, an engine.

Importing this package pulls in torch but never the HTTP stack (`serve.server` imports fastapi on its own).
"""

from __future__ import annotations

from .types import GenerationRequest, TokenEvent

__all__ = ["GenerationRequest", "TokenEvent"]

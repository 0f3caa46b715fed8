"""Iteration-level (continuous) batching for greedy generation over many adapters.

Every `step()` runs ONE forward over the running batch: requests that just joined are prefilled (their whole
prompt) in the same forward as the others' decode tokens; finished requests leave at once and waiting ones join.
Each sequence keeps its own KV cache. At most `max_adapters_per_step` distinct adapters run in one step;
waiting requests are admitted oldest first (FIFO aging), so no adapter starves.
"""

from __future__ import annotations

from .store import AdapterStore
from .types import GenerationRequest, TokenEvent

__all__ = ["Engine", "GenerationRequest", "TokenEvent"]

DEFAULT_CACHE_BYTES = 1 << 30


class Engine:
    """Continuous-batching greedy generation. `model` is a `serve.model.ServingModel` (or a HF causal LM,
    which is wrapped). The HTTP server drives it from one thread: add_request / abort / step / has_work."""

    def __init__(self, model, store: AdapterStore, *, max_batch: int = 32, max_adapters_per_step: int = 8,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        raise NotImplementedError("interface only; the implementation lands in the next commit")

    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request. Unknown adapter -> KeyError naming it and the registered ones; duplicate id or bad
        fields -> ValueError."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or running); its next step() emits a TokenEvent(finish_reason="abort")."""
        raise NotImplementedError

    def step(self) -> list[TokenEvent]:
        """One iteration over the running batch; one event per running request (plus aborts/errors)."""
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def stats(self) -> dict:
        """{"running", "waiting", "steps", "cache": {hits, misses, evictions, bytes, budget, ...}}."""
        raise NotImplementedError

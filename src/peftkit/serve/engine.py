"""Iteration-level (continuous) batching for greedy generation over many adapters.

Every `step()` runs ONE forward over the running batch: requests that just joined are prefilled (their whole
prompt) in the same forward as the others' decode tokens; finished requests leave at once and waiting ones join.
Each sequence has its own KV cache, held as a row of the last forward's batched cache; a step lays the rows out
as one batch (past left-padded, new tokens right-padded, an attention mask over both, explicit position ids), so
a row computes exactly what it computes alone. In steady decode (no request joined, one new token per row) the
last forward's cache is reused in place (`batching.decode_batch`): no per-step rebuild or copy of the context.
Logits are computed only at each row's last token. Rows are ordered by adapter, so the batched op's segments
are plain slices.

Admission: at most `max_batch` running requests and `max_adapters_per_step` distinct adapters per step (the base
model takes no slot). Waiting requests are admitted oldest first; a later request may pass a blocked head only
while the head is younger than `aging_steps` steps, after which nothing passes it until its adapter fits
(FIFO aging: no adapter starves). Adapters of queued requests are prefetched in the background; adapters of
running requests are pinned in the cache.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from dataclasses import dataclass

import torch

from .batching import Batch, build_batch, decode_batch, split_cache
from .cache import AdapterCache
from .model import ServingModel
from .ops import Slots
from .store import AdapterStore
from .types import GenerationRequest, TokenEvent

__all__ = ["Engine", "GenerationRequest", "TokenEvent"]

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class _Seq:
    req: GenerationRequest
    arrived: int  # engine step at arrival
    tokens: list[int]  # prompt + generated so far
    generated: int = 0
    cached: int = 0  # tokens whose keys/values are in this sequence's row of the last forward's cache


class Engine:
    """Continuous-batching greedy generation. `model` is a `ServingModel` or a HF causal LM (wrapped with the
    default op back end). The HTTP server drives it from one thread: add_request / abort / step / has_work;
    add_request, abort and stats may be called from other threads."""

    def __init__(self, model, store: AdapterStore, *, max_batch: int = 32, max_adapters_per_step: int = 8,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, aging_steps: int = 8, prefetch: bool = True) -> None:
        if max_batch < 1 or max_adapters_per_step < 1:
            raise ValueError("max_batch and max_adapters_per_step must be >= 1")
        self.model = model if isinstance(model, ServingModel) else ServingModel(model)
        self.store = store
        if store.check is None:
            store.check = self.model.check
        for name in store.names():  # registered before the engine existed: check them now
            self.model.check(store.get(name))
        self.max_batch, self.max_adapters, self.aging_steps = max_batch, max_adapters_per_step, aging_steps
        self.cache = AdapterCache(self._load, cache_bytes)
        self.prefetch = prefetch
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._aborted: set[str] = set()
        self._ids: set[str] = set()
        self._lock = threading.RLock()
        self._pinned: set[str] = set()
        self._slots: tuple[tuple[str, ...], Slots] = ((), Slots([]))
        self.steps = 0
        self.counters = {"generated_tokens": 0, "prefill_tokens": 0, "finished": 0, "errors": 0}
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._last: tuple[list[_Seq], Batch, object] | None = None  # the last forward: rows, batch, output cache
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.model.forward).parameters

    # --- requests -----------------------------------------------------------------------------------------------
    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request. Unknown adapter -> KeyError naming it and the registered ones; duplicate id or bad
        fields -> ValueError naming the field."""
        if req.adapter is not None and req.adapter not in self.store:
            self.store.get(req.adapter)  # raises KeyError listing the registered adapters
        if not req.prompt_ids or not all(isinstance(t, int) and t >= 0 for t in req.prompt_ids):
            raise ValueError("prompt_ids: must be a non-empty list of token ids (ints >= 0)")
        if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {req.max_new_tokens!r}")
        if self.max_positions and len(req.prompt_ids) >= self.max_positions:
            raise ValueError(f"prompt_ids: {len(req.prompt_ids)} tokens leave no room to generate in the model's "
                             f"{self.max_positions} positions; shorten the prompt")
        with self._lock:
            if req.request_id in self._ids:
                raise ValueError(f"request_id: {req.request_id!r} is already queued or running; use a unique id")
            self._ids.add(req.request_id)
            self._waiting.append(_Seq(req, self.steps, list(req.prompt_ids)))

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or running); the next step() emits TokenEvent(finish_reason="abort")."""
        with self._lock:
            if request_id in self._ids:
                self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborted)

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "steps": self.steps,
                    "adapters_in_step": len(self._slots[0]), **self.counters, "cache": self.cache.stats()}

    # --- one iteration ----------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One iteration over the running batch: one event per running request, plus aborts and errors."""
        with self._lock:
            events = self._take_aborts()
            events += self._admit()
            running = list(self._running)
            self.steps += 1
        self._update_pins({s.req.adapter for s in running} - {None})
        if self.prefetch:
            self._prefetch()
        if not running:
            self._last = None  # nothing left to decode: drop the batched cache
            return events
        try:
            events += self._forward(running)
        except Exception as e:  # noqa: BLE001 - a failed step must not kill the engine; fail its requests
            self._last = None
            with self._lock:
                events += [self._finish(s, None, f"error: {type(e).__name__}: {e}") for s in running]
                self.counters["errors"] += len(running)
        return events

    def _take_aborts(self) -> list[TokenEvent]:
        if not self._aborted:
            return []
        gone = [s for s in [*self._waiting, *self._running] if s.req.request_id in self._aborted]
        self._aborted.clear()
        return [self._finish(s, None, "abort") for s in gone]

    def _finish(self, seq: _Seq, token: int | None, reason: str) -> TokenEvent:
        """Remove `seq` wherever it is; its final event. Caller holds the lock."""
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        self._ids.discard(seq.req.request_id)
        self.counters["finished"] += 1
        return TokenEvent(seq.req.request_id, token, True, reason)

    def _admit(self) -> list[TokenEvent]:
        """Move waiting requests into the running batch (FIFO with aging, adapter cap). Caller holds the lock."""
        events, active = [], {s.req.adapter for s in self._running} - {None}
        i = 0
        while len(self._running) < self.max_batch and i < len(self._waiting):
            seq = self._waiting[i]
            name = seq.req.adapter
            if name is None or name in active or len(active) < self.max_adapters:
                try:
                    if name is not None and name not in active:
                        self._lowered(name)  # load now (or a prefetch finished it): errors fail this request
                        self._pin(name)
                except Exception as e:  # noqa: BLE001 - a bad adapter file fails its requests only
                    events.append(self._finish(seq, None, f"error: {type(e).__name__}: {e}"))
                    self.counters["errors"] += 1
                    continue
                del self._waiting[i]
                self._running.append(seq)
                active |= {name} - {None}
                continue
            if i == 0 and self.steps - seq.arrived >= self.aging_steps:
                break  # the head has waited long enough: nobody passes it until its adapter fits
            i += 1
        return events

    def _prefetch(self) -> None:
        with self._lock:
            queued = list(dict.fromkeys(s.req.adapter for s in self._waiting if s.req.adapter is not None))
        self.cache.prefetch(queued[:self.max_adapters])

    def _pin(self, name: str) -> None:
        if name not in self._pinned:
            self.cache.pin([name])
            self._pinned.add(name)

    def _update_pins(self, names: set[str]) -> None:
        self.cache.pin(names - self._pinned)
        self.cache.unpin(self._pinned - names)
        self._pinned = names

    # --- adapters -------------------------------------------------------------------------------------------
    def _load(self, name: str):
        item = self.store.get(name)
        lowered, nbytes = self.model.lower(self.store, name)
        return (item, lowered), nbytes

    def _lowered(self, name: str):
        item, lowered = self.cache.get(name)
        if name in self.store and self.store.get(name) is not item:  # re-registered under the same name
            self.cache.invalidate(name)
            item, lowered = self.cache.get(name)
        return lowered

    def _slot_table(self, names: tuple[str, ...]) -> Slots:
        """The slot table for this step's adapters; kept while the set is unchanged (stacks are reused)."""
        if self._slots[0] != names:
            self._slots = (names, Slots([self._lowered(n) for n in names]))
        return self._slots[1]

    # --- the forward ------------------------------------------------------------------------------------------
    def _forward(self, running: list[_Seq]) -> list[TokenEvent]:
        names = tuple(sorted({s.req.adapter for s in running} - {None}))
        slot_of = {n: i for i, n in enumerate(names)}
        order = sorted(running, key=lambda s: (slot_of.get(s.req.adapter, -1), s.arrived))
        with torch.inference_mode():
            slots = self._slot_table(names)
            batch = self._batch(order)
            kwargs = batch.kwargs if self._keeps_logits else {k: v for k, v in batch.kwargs.items()
                                                              if k != "logits_to_keep"}
            out = self.model.forward([slot_of.get(s.req.adapter, -1) for s in order], slots, **kwargs)
            index = torch.zeros_like(batch.last_index) if self._keeps_logits else batch.last_index
            next_ids = out.logits[torch.arange(len(order)), index].argmax(-1).tolist()  # (B,) from (B, V)
        self._last = (order, batch, out.past_key_values)
        events = []
        with self._lock:
            for seq, token in zip(order, next_ids, strict=True):
                if seq.cached == 0:
                    self.counters["prefill_tokens"] += len(seq.tokens)
                seq.cached = len(seq.tokens)
                seq.tokens.append(token)
                seq.generated += 1
                self.counters["generated_tokens"] += 1
                events.append(self._event(seq, token))
        return events

    def _batch(self, order: list[_Seq]) -> Batch:
        """This step's batch: the last forward's cache reused in steady decode, else rebuilt from its rows."""
        kv_of = {}
        if self._last is not None:
            rows, prev, cache = self._last
            where = {id(s): i for i, s in enumerate(rows)}
            keep = [where.get(id(s)) for s in order]
            if prev.aligned and all(b is not None and len(s.tokens) - s.cached == 1 and prev.lengths[b] == s.cached
                                    for s, b in zip(order, keep, strict=True)):
                return decode_batch(prev, cache, keep, [s.tokens[-1] for s in order])
            kvs = split_cache(cache, prev)  # views; build_batch copies them into the new layout
            kv_of = {id(s): kvs[i] for i, s in enumerate(rows) if prev.lengths[i] == s.cached}
        for s in order:
            if s.cached and id(s) not in kv_of:
                s.cached = 0  # no cache for it (cannot happen in normal operation): prefill it again
        return build_batch([(s.tokens[s.cached:], kv_of.get(id(s), [])) for s in order], self._device())

    def _event(self, seq: _Seq, token: int) -> TokenEvent:
        if seq.req.request_id in self._aborted:
            return TokenEvent(seq.req.request_id, token, False, None)  # the abort event follows next step
        if token in seq.req.stop_token_ids:
            return self._finish(seq, token, "stop")
        if seq.generated >= seq.req.max_new_tokens:
            return self._finish(seq, token, "length")
        if self.max_positions and len(seq.tokens) >= self.max_positions:
            return self._finish(seq, token, "length")
        return TokenEvent(seq.req.request_id, token, False, None)

    def _device(self) -> torch.device:
        return next(self.model.model.parameters()).device

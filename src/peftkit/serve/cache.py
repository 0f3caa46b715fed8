"""An LRU host-memory cache of lowered adapter weights, budgeted in BYTES, with pinning and prefetch.

Entries are whatever the loader returns plus their size in bytes. `pin` / `unpin` count references: a pinned
entry (an adapter the running batch uses) is never evicted, even when the budget is exceeded (the overshoot
is reported as `over_budget` and given back as soon as the pins drop). `prefetch` loads entries for queued
requests on one background thread, so disk reads and lowering overlap the running batch's compute.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["AdapterCache"]


class AdapterCache:
    """loader(name) -> (value, nbytes). get(name) returns the value (loading on a miss)."""

    def __init__(self, loader: Callable[[str], tuple[Any, int]], budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {budget_bytes}")
        self.loader, self.budget = loader, budget_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # LRU order: oldest first
        self._pins: dict[str, int] = {}
        self._pending: dict[str, Future] = {}
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self.bytes = 0
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "prefetches": 0, "prefetch_hits": 0,
                         "load_errors": 0}

    # --- lookups ------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                self.counters["hits"] += 1
                return self._entries[name][0]
            pending = self._pending.get(name)
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - the prefetch failed; load again below and raise from there
                pass
            with self._lock:
                if name in self._entries:
                    self._entries.move_to_end(name)
                    self.counters["prefetch_hits"] += 1
                    return self._entries[name][0]
        with self._lock:
            self.counters["misses"] += 1
        return self._load(name)

    def _load(self, name: str) -> Any:
        try:
            value, nbytes = self.loader(name)
        except Exception:
            with self._lock:
                self.counters["load_errors"] += 1
            raise
        with self._lock:
            self._insert(name, value, nbytes)
        return value

    def _insert(self, name: str, value: Any, nbytes: int) -> None:
        if name in self._entries:
            self.bytes -= self._entries.pop(name)[1]
        self._entries[name] = (value, nbytes)
        self.bytes += nbytes
        self._evict(keep=name)

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned entries until within budget (never `keep`, the entry just loaded
        for a caller about to use it)."""
        for victim in [n for n in self._entries if not self._pins.get(n) and n != keep]:
            if self.bytes <= self.budget:
                break
            self.bytes -= self._entries.pop(victim)[1]
            self.counters["evictions"] += 1

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def invalidate(self, name: str) -> None:
        """Forget an entry (the adapter was unregistered or replaced); pins keep counting."""
        with self._lock:
            if name in self._entries:
                self.bytes -= self._entries.pop(name)[1]

    # --- pinning --------------------------------------------------------------------------------------------
    def pin(self, names: Iterable[str]) -> None:
        with self._lock:
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1

    def unpin(self, names: Iterable[str]) -> None:
        with self._lock:
            for n in names:
                left = self._pins.get(n, 0) - 1
                if left > 0:
                    self._pins[n] = left
                else:
                    self._pins.pop(n, None)
            self._evict()

    def pinned(self) -> set[str]:
        with self._lock:
            return {n for n, c in self._pins.items() if c > 0}

    # --- prefetch -------------------------------------------------------------------------------------------
    def prefetch(self, names: Iterable[str]) -> None:
        """Start loading `names` in the background; skipped when cached, pending, or when making room would
        need evicting a pinned entry (prefetch never pushes out what a running batch uses)."""
        with self._lock:
            for name in names:
                if name in self._entries or name in self._pending or not self._room_for_more():
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="peftkit-prefetch")
                self.counters["prefetches"] += 1
                fut = self._pool.submit(self._prefetch_one, name)
                self._pending[name] = fut

    def _room_for_more(self) -> bool:
        unpinned = sum(b for n, (_, b) in self._entries.items() if not self._pins.get(n))
        return self.bytes - unpinned < self.budget

    def _prefetch_one(self, name: str) -> None:
        try:
            self._load(name)
        finally:
            with self._lock:
                self._pending.pop(name, None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "bytes": self.bytes, "budget": self.budget, "entries": len(self._entries),
                    "pinned": len(self.pinned()), "over_budget": max(0, self.bytes - self.budget)}

"""AdapterCache: LRU in bytes, pinned entries never evicted, background prefetch, counters."""

from __future__ import annotations

import threading

import pytest

from peftkit.serve.cache import AdapterCache


class Loader:
    def __init__(self, sizes: dict[str, int], gate: threading.Event | None = None) -> None:
        self.sizes, self.calls, self.gate = sizes, [], gate

    def __call__(self, name: str):
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(name)
        if name == "broken":
            raise OSError("cannot read broken")
        return f"value-{name}", self.sizes[name]


def test_lru_budget_in_bytes():
    cache = AdapterCache(Loader({"a": 40, "b": 40, "c": 30, "big": 90}), budget_bytes=100)
    cache.get("a"), cache.get("b"), cache.get("a")  # a is now most recent
    cache.get("c")  # 110 > 100: evicts b (least recent), not a
    assert "a" in cache and "b" not in cache and "c" in cache and cache.bytes == 70
    cache.get("big")  # needs everything else out
    assert cache.stats()["entries"] == 1 and cache.bytes == 90
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 4, 3)


def test_pinned_entries_are_never_evicted():
    cache = AdapterCache(Loader({"a": 60, "b": 60, "c": 60}), budget_bytes=100)
    cache.get("a")
    cache.pin(["a"])
    cache.get("b")  # over budget, but a is pinned and b was just loaded for a caller: both stay
    assert "a" in cache and "b" in cache and cache.stats()["over_budget"] == 20
    cache.get("c")  # b is unpinned and least recently used: it goes; a (pinned) and c (just loaded) stay
    assert "a" in cache and "b" not in cache and "c" in cache
    cache.pin(["c", "a"])
    cache.unpin(["a"])  # a is still pinned once
    assert "a" in cache and cache.stats()["over_budget"] == 20
    cache.unpin(["a"])  # a's pins drop: it is evicted to get back under budget, c (pinned) stays
    assert "a" not in cache and "c" in cache and cache.bytes <= 100 and cache.pinned() == {"c"}


def test_prefetch_overlaps_and_counts():
    gate = threading.Event()
    loader = Loader({"a": 10, "b": 10}, gate)
    cache = AdapterCache(loader, budget_bytes=100)
    cache.prefetch(["a", "a", "b"])
    assert cache.stats()["prefetches"] == 2 and "a" not in cache  # still loading
    gate.set()
    assert cache.get("a") == "value-a" and cache.get("b") == "value-b"
    s = cache.stats()
    assert s["misses"] == 0 and s["prefetch_hits"] + s["hits"] == 2 and loader.calls.count("a") == 1
    cache.close()


def test_prefetch_never_pushes_out_pinned_entries():
    cache = AdapterCache(Loader({"a": 100, "b": 10}), budget_bytes=100)
    cache.get("a")
    cache.pin(["a"])
    cache.prefetch(["b"])  # no room without evicting a pinned entry: skipped
    assert cache.stats()["prefetches"] == 0
    cache.close()


def test_load_errors_propagate_and_invalidate():
    cache = AdapterCache(Loader({"a": 10}), budget_bytes=100)
    with pytest.raises(OSError, match="broken"):
        cache.get("broken")
    assert cache.stats()["load_errors"] == 1
    cache.get("a")
    cache.invalidate("a")
    assert "a" not in cache and cache.bytes == 0
    with pytest.raises(ValueError, match="cache_bytes"):
        AdapterCache(Loader({}), budget_bytes=0)

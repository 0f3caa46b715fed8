"""Merging, disabling and unloading: merged == unmerged, unmerge restores the base, disabled == base."""

from __future__ import annotations

import copy

import pytest

from peftkit import MergeError

from .conftest import Env, assert_state_equal, close, hosts, state


def _base_weights(env: Env) -> dict:
    """The state of the wrapped model's base tensors (adapter tensors left out)."""
    return {k: v for k, v in state(env.model).items() if ".adapters." not in k}


def test_merged_equals_unmerged_and_unmerge_restores(adapted: Env) -> None:
    adapted.require("mergeable")
    unmerged = adapted.out()
    before = _base_weights(adapted)
    adapted.model.merge()
    assert all(h.merged for _, h in hosts(adapted.model))
    close(adapted.out(), unmerged)
    adapted.model.merge()  # merging what is merged is a no-op
    close(adapted.out(), unmerged)
    adapted.model.unmerge()
    assert not any(h.merged for _, h in hosts(adapted.model))
    after = _base_weights(adapted)
    assert after.keys() == before.keys()
    for k in before:
        close(after[k], before[k], atol=1e-6, rtol=0)
    close(adapted.out(), unmerged)


def test_disabled_equals_base(adapted: Env) -> None:
    adapted_out = adapted.out()
    with adapted.model.disabled():
        close(adapted.out(), adapted.base_out, atol=1e-6, rtol=0)
    close(adapted.out(), adapted_out, atol=0, rtol=0)


def test_disabled_equals_base_when_merged(adapted: Env) -> None:
    """disabled() unmerges, which restores weights within 1e-6 (not bit-for-bit): outputs within 1e-5."""
    adapted.require("mergeable")
    adapted_out = adapted.out()
    adapted.model.merge()
    with adapted.model.disabled():
        close(adapted.out(), adapted.base_out)
    assert all(h.merged for _, h in hosts(adapted.model)), "disabled() did not restore the merge"
    close(adapted.out(), adapted_out)


def test_merge_and_unload_gives_plain_model(adapted: Env) -> None:
    adapted.require("mergeable")
    adapted_out = adapted.out()
    plain = adapted.model.merge_and_unload()
    assert not [n for n, m in plain.named_modules() if type(m).__module__.startswith("peftkit")]
    assert all(p.grad is None for p in plain.parameters())
    close(adapted.out(plain), adapted_out)


def test_unload_gives_back_base(adapted: Env) -> None:
    plain = adapted.model.unload()
    assert not [n for n, m in plain.named_modules() if type(m).__module__.startswith("peftkit")]
    close(adapted.out(plain), adapted.base_out, atol=1e-6, rtol=0)
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in adapted.pristine.named_modules()]


def test_unload_after_merge_gives_back_base(adapted: Env) -> None:
    adapted.require("mergeable")
    adapted.model.merge()
    plain = adapted.model.unload()
    assert_state_equal(state(plain), state(adapted.pristine), atol=1e-6)
    close(adapted.out(plain), adapted.base_out)


def test_merge_with_two_active_adapters(adapted: Env) -> None:
    """merge() folds every active adapter: the merged model computes what the unmerged one did."""
    adapted.require("mergeable")
    adapted.add("b", seed=2)
    adapted.model.set_active("default", "b")
    unmerged = adapted.out()
    merged_and_unloaded = copy.deepcopy(adapted.model).merge_and_unload()
    adapted.model.merge()
    close(adapted.out(), unmerged)
    close(adapted.out(merged_and_unloaded), unmerged)


def test_merge_one_then_the_other_equals_merging_both(adapted: Env) -> None:
    """Merging in two calls re-merges against the original weight when an adapter reads the base output."""
    adapted.require("mergeable")
    adapted.add("b", seed=2)
    adapted.model.set_active("default", "b")
    unmerged = adapted.out()
    adapted.model.set_active("default")
    adapted.model.merge(["default"])
    adapted.model.set_active("default", "b")
    adapted.model.merge(["b"])
    close(adapted.out(), unmerged)
    adapted.model.unmerge()
    close(adapted.out(), unmerged)


def test_partial_merge_refused_when_an_active_adapter_reads_the_base(adapted: Env) -> None:
    adapted.require("mergeable")
    if not adapted.spec.adapter_cls.needs_base_output:
        pytest.skip("only adapters that read the base output constrain partial merges")
    adapted.add("b", seed=2)
    adapted.model.set_active("default", "b")
    before, weights = adapted.out(), state(adapted.model)
    with pytest.raises(MergeError, match="stay active and unmerged"):
        adapted.model.merge(["default"])
    assert_state_equal(state(adapted.model), weights, atol=0)
    assert all(not h.merged for _, h in adapted.model.hosts() if hasattr(h, "merged"))
    close(adapted.out(), before)


def test_routed_forward_while_merged_raises(adapted: Env) -> None:
    adapted.require("mergeable")
    adapted.add("b", seed=2)
    adapted.model.merge()
    with pytest.raises(MergeError), adapted.model.routed(["default", "b", "__base__", "b"]):
        adapted.out()
    assert adapted.model.routing.rows is None

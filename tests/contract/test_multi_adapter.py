"""Several adapters: contributions add, mixed batches route per row, names are checked, delete restores."""

from __future__ import annotations

import pytest
import torch

from peftkit import AdapterNameError

from .conftest import Env, close, hosts, state, structure

ROWS = ["default", "b", "__base__", "b"]


@pytest.fixture
def two(adapted: Env) -> Env:
    """Adapters "default" (active) and "b" (inactive), both perturbed."""
    adapted.add("b", seed=2, active=False)
    return adapted


def _host_inputs(env: Env) -> dict[str, tuple]:
    """The positional inputs each adapted layer receives in one base forward."""
    seen: dict[str, tuple] = {}
    handles = [h.register_forward_pre_hook(lambda _m, args, p=p: seen.setdefault(p, args))
               for p, h in hosts(env.model)]
    with env.model.disabled():
        env.out()
    for handle in handles:
        handle.remove()
    return seen


def test_contributions_add(two: Env) -> None:
    """Per adapted layer: out(a, b) - base == (out(a) - base) + (out(b) - base)."""
    inputs = _host_inputs(two)
    assert inputs.keys() == {p for p, _ in hosts(two.model)}
    for path, host in hosts(two.model):
        outs = {}
        for names in ((), ("default",), ("b",), ("default", "b")):
            two.model.set_active(*names)
            with torch.no_grad():
                outs[names] = host(*inputs[path])
        base = outs[()]
        close(outs[("default", "b")] - base, (outs[("default",)] - base) + (outs[("b",)] - base))


def test_both_active_differs_from_each(two: Env) -> None:
    two.model.set_active("default")
    out_a = two.out()
    two.model.set_active("b")
    out_b = two.out()
    two.model.set_active("default", "b")
    out_ab = two.out()
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)


def test_mixed_batch_equals_per_row(two: Env) -> None:
    with two.model.routed(ROWS):
        mixed = two.out()
    assert mixed.shape[0] == len(ROWS)
    for i, name in enumerate(ROWS):
        if name == "__base__":
            with two.model.disabled():
                expected = two.out(batch=two.row(i))
        else:
            two.model.set_active(name)
            expected = two.out(batch=two.row(i))
        close(mixed[i:i + 1], expected)


def test_routing_is_cleared_after_the_block(two: Env) -> None:
    two.model.set_active("default")
    before = two.out()
    with two.model.routed(ROWS):
        pass
    assert torch.equal(two.out(), before)


def test_routed_unknown_adapter_raises(two: Env) -> None:
    with pytest.raises(AdapterNameError), two.model.routed(["default", "nope", "b", "b"]):
        pass


def test_delete_adapter_restores_base(adapted: Env) -> None:
    adapted.model.delete_adapter("default")
    close(adapted.out(), adapted.base_out, atol=1e-6, rtol=0)
    assert not hosts(adapted.model)
    assert structure(adapted.model.model) == structure(adapted.pristine)
    assert adapted.model.active == () and adapted.model.trainable == ()


def test_delete_one_of_two_keeps_the_other(two: Env) -> None:
    two.model.set_active("b")
    out_b = two.out()
    two.model.delete_adapter("default")
    assert two.model.active == ("b",)
    close(two.out(), out_b, atol=1e-6, rtol=0)


def test_name_collision_raises_and_changes_nothing(adapted: Env) -> None:
    before, shape = state(adapted.model), structure(adapted.model)
    with pytest.raises(AdapterNameError):
        adapted.model.add_adapter("default", adapted.config())
    after = state(adapted.model)
    assert structure(adapted.model) == shape
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("call", ["delete_adapter", "set_active", "set_trainable", "merge"])
def test_unknown_adapter_name_raises(adapted: Env, call: str) -> None:
    with pytest.raises(AdapterNameError):
        fn = getattr(adapted.model, call)
        fn(["nope"]) if call == "merge" else fn("nope")

"""Identity at init, and only adapter parameters train (requires_grad, gradients, one optimizer step)."""

from __future__ import annotations

import torch

from .conftest import Env, adapter_params, close, state


def _loss(env: Env) -> torch.Tensor:
    return env.case.output_fn(env.model, env.batch).float().square().mean()


def test_identity_at_init(env: Env) -> None:
    env.require("identity_at_init")
    env.add("default")
    close(env.out(), env.base_out, atol=1e-6, rtol=1e-6)


def test_requires_grad_is_exactly_the_adapter_params(env: Env) -> None:
    env.add("default")
    trainable = {id(p) for p in env.model.parameters() if p.requires_grad}
    adapters = {id(p) for p in adapter_params(env.model)}
    assert adapters, "the adapter has no parameters"
    assert trainable == adapters
    report = env.model.param_report()
    assert report.trainable == sum(p.numel() for p in {id(p): p for p in adapter_params(env.model)}.values())


def test_backward_reaches_only_adapter_params(env: Env) -> None:
    env.add("default")
    _loss(env).backward()
    adapters = {id(p) for p in adapter_params(env.model)}
    for name, p in env.model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None, f"adapter parameter {name} got no gradient"
        else:
            assert p.grad is None, f"base parameter {name} got a gradient"


def test_sgd_step_changes_only_adapter_params(env: Env) -> None:
    env.add("default")
    adapters = {id(p) for p in adapter_params(env.model)}
    adapter_keys = {n for n, p in env.model.named_parameters(remove_duplicate=False) if id(p) in adapters}
    before = state(env.model)
    opt = torch.optim.SGD([p for p in env.model.parameters() if p.requires_grad], lr=0.1)
    _loss(env).backward()
    opt.step()
    after = state(env.model)
    assert before.keys() == after.keys()
    for key in before.keys() - adapter_keys:
        assert torch.equal(before[key], after[key]), f"base tensor {key} changed"
    assert any(not torch.equal(before[k], after[k]) for k in adapter_keys), "no adapter parameter changed"


def test_trainable_and_active_are_independent(env: Env) -> None:
    env.add("default", seed=1)
    env.add("b", seed=2, active=False, trainable=False)
    env.model.set_active("b")
    out_b = env.out()
    env.model.set_trainable("default")
    default = {id(p) for p in adapter_params(env.model, "default")}
    assert {id(p) for p in env.model.parameters() if p.requires_grad} == default
    close(env.out(), out_b, atol=0, rtol=0)  # changing what trains does not change what runs
    env.model.set_active("default", "b")
    _loss(env).backward()
    for name, p in env.model.named_parameters():
        if id(p) in default:
            assert p.grad is not None, f"trainable adapter parameter {name} got no gradient"
        else:
            assert p.grad is None, f"frozen parameter {name} got a gradient"

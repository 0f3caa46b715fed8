"""Servable adapters: the canonical low-rank form `lowered()` computes exactly what the adapter adds.

Per adapted layer, with the layer's recorded input x and base output z (eval mode, perturbed adapter):
    adapter(x, z) == low.contribution(ops, x, z)   for low = adapter.lowered()
i.e. d = scale * (up(down(x, A), B) + bias), plus the channel-scaled form out_scale * (z + d) - z (see LowRank).
Serving batches adapters through this form, so a method that declares "servable" must pass.
"""

from __future__ import annotations

import torch

from .conftest import Env, close, hosts


def _recorded_inputs(env: Env) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def record(path: str):
        def hook(module, args, output) -> None:
            seen.setdefault(path, args[0])
        return hook

    handles = [h.register_forward_hook(record(p)) for p, h in hosts(env.model)]
    try:
        env.out()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_lowered_form_equals_the_adapter(adapted: Env) -> None:
    adapted.require("servable")
    adapted.model.eval()
    inputs = _recorded_inputs(adapted)
    for path, host in hosts(adapted.model):
        adapter, x = host.adapters["default"], inputs[path]
        low = adapter.lowered()
        assert low is not None, f"{path}: a servable adapter returned no lowered form"
        with torch.no_grad():
            z = host.ops.without_bias(host.base_layer(x))
            expected = adapter(x, z)
            got = low.contribution(host.ops, x, z)
        close(got.to(expected.dtype), expected)
        if low.out_scale is not None:
            assert low.out_scale.shape == (host.ops.out_features,), f"{path}: out_scale must be (out,)"

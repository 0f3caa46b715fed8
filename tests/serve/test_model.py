"""ServingModel: the batched forward equals the core reference routed path; the Routing.executor hook."""

from __future__ import annotations

import pytest
import torch

from peftkit import AdapterModel, LoraConfig, load_adapter
from peftkit.core.host import BASE
from peftkit.errors import ConfigError
from peftkit.serve.model import ServingModel
from peftkit.serve.ops import BACKENDS, Slots
from peftkit.serve.store import AdapterStore

from .test_engine import ADAPTERS, save_random, tiny_llama


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_random(root / name, fields, seed) for name, (fields, seed) in ADAPTERS.items()}


def test_routing_executor_replaces_the_reference_loop():
    am = AdapterModel(tiny_llama(torch.float32))
    am.add_adapter("x", LoraConfig(r=2, target_modules=["q_proj"]))
    calls = []

    def executor(layer, x, y):
        calls.append((type(layer).__name__, tuple(x.shape)))
        return y + 1  # visible in the output

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad(), am.routed(["x", BASE]):
        ref = am(input_ids=ids).logits
    am.routing.executor = executor
    with torch.no_grad(), am.routed(["x", BASE]):
        got = am(input_ids=ids).logits
    assert calls == [("AdaptedLayer", (2, 3, 32))] * 2 and not torch.equal(got, ref)
    am.routing.executor = None
    with torch.no_grad():
        am(input_ids=ids)  # not routed: the executor is never consulted
    assert len(calls) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_forward_equals_core_routed_reference(dirs, backend):
    """Rows with different adapters (LoRA, rsLoRA, DoRA, base) in one forward == AdapterModel.routed."""
    store = AdapterStore()
    model = ServingModel(tiny_llama(torch.float32), backend=backend)
    store.check = model.check
    for name, path in dirs.items():
        store.register(name, path)
    names = sorted(dirs)
    slots = Slots([model.lower(store, n)[0] for n in names])
    rows = ["a", "d", None, "b", "c", "a", "d"]
    ids = torch.randint(64, (len(rows), 5), generator=torch.Generator().manual_seed(0))
    got = model.forward([names.index(r) if r else -1 for r in rows], slots, input_ids=ids).logits
    am = AdapterModel(tiny_llama(torch.float32))
    for name, path in dirs.items():
        load_adapter(am, path, name=name)
    with torch.no_grad(), am.routed([r or BASE for r in rows]):
        ref = am(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_lowered_bytes_and_dtype(dirs):
    model = ServingModel(tiny_llama(torch.float32))
    store = AdapterStore(check=model.check)
    store.register("d", dirs["d"])
    lowered, nbytes = model.lower(store, "d")
    assert set(lowered) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.gate_proj")}
    assert all(low.a.dtype == torch.float32 and low.out_scale is not None for low in lowered.values())
    assert nbytes == sum(4 * (low.a.numel() + low.b.numel() + low.out_scale.numel()) for low in lowered.values())


def test_unknown_backend_names_the_field():
    with pytest.raises(ConfigError, match="backend: unknown op back end 'fast'"):
        ServingModel(tiny_llama(), backend="fast")

"""BitFit (spec 1.23): exactly the bias deltas train, the saved adapter holds only bias deltas, the closed form
y = W x + b + delta on every supported layer type, BEFT-style biases on bias-free Llama layers (merge adds a bias
parameter and unmerge removes it), and config errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, NonFiniteWeightError, UnsupportedLayerError
from peftkit.core.registry import config_for_peft_type
from peftkit.methods.bitfit import BitFitConfig

from ._helpers import close, hosts, logits, perturb, tiny_gpt2, tiny_llama, token_ids


def _model(base: nn.Module, name: str = "a", **kw) -> AdapterModel:
    model = AdapterModel(base)
    model.add_adapter(name, BitFitConfig(**kw))
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if ".adapters." not in k}


def test_closed_form_on_every_layer_type():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    cases = [(nn.Linear(6, 5), torch.randn(3, 2, 6), (1, 5)), (Conv1D(5, 6), torch.randn(3, 6), (1, 5)),
             (nn.Linear(6, 5, bias=False), torch.randn(4, 6), (1, 5)),
             (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5), (1, 4, 1, 1))]
    for layer, x, shape in cases:
        model = _model(nn.Sequential(copy.deepcopy(layer)), target_modules=["0"], init_weights=False)
        adapter = hosts(model)["0"].adapters["a"]
        delta = adapter.bitfit_bias.detach()
        assert close(model(x), layer(x) + delta.reshape(shape))
        assert close(adapter(x, None), torch.zeros_like(layer(x)) + delta.reshape(shape))  # full output shape
        low = adapter.lowered()
        assert close(low.contribution(adapter.ops, x, None), adapter(x, None))


def test_identity_at_init_is_exact():
    base, x = tiny_llama(), token_ids()
    model = _model(copy.deepcopy(base), target_modules="all-linear")
    assert torch.equal(logits(model, x), logits(base, x))


def test_exactly_the_bias_deltas_train_and_only_they_change():
    base, x = tiny_gpt2(), token_ids()
    model = _model(copy.deepcopy(base), target_modules="all-linear")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    paths = list(hosts(model))
    assert sorted(trainable) == sorted(f"model.{p}.adapters.a.bitfit_bias" for p in paths)
    assert all(p.dim() == 1 for p in trainable.values())
    before = _plain_state(model.model)
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    model(x, labels=x).loss.backward()
    opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    after = _plain_state(model.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base biases stay frozen


def test_saved_adapter_holds_only_bias_deltas(tmp_path):
    base, x = tiny_gpt2(), token_ids()
    model = _model(copy.deepcopy(base), target_modules=["c_attn", "c_fc"])
    perturb(model.named_parameters())
    peftkit.save_adapter(model, tmp_path, "a")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    out = {p: h.ops.out_features for p, h in hosts(model).items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == {f"base_model.model.{p}.bitfit_bias": (n,)
                                                             for p, n in out.items()}
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path, "a")
    assert torch.equal(logits(loaded, x), logits(model, x))
    # merged into the base, the adapter changes only biases (spec: a diff against the base touches only biases)
    merged = _plain_state(model.merge_and_unload())
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, merged[k])}
    assert changed and all(k.endswith(".bias") for k in changed)


def test_bias_free_llama_merge_adds_and_unmerge_removes_the_bias():
    base, x = tiny_llama(), token_ids()
    model = _model(copy.deepcopy(base), target_modules=["q_proj", "down_proj"], init_weights=False)
    model.add_adapter("b", BitFitConfig(target_modules=["q_proj"], init_weights=False))
    model.set_active("a", "b")
    want, keys = logits(model, x), set(model.state_dict())
    model.merge(["a"])
    model.merge(["b"])
    layer = hosts(model)["model.layers.0.self_attn.q_proj"].base_layer
    assert layer.bias is not None and not layer.bias.requires_grad
    assert close(logits(model, x), want)
    model.unmerge()
    assert layer.bias is None and set(model.state_dict()) == keys
    assert close(logits(model, x), want)
    plain = model.merge_and_unload()
    assert plain.model.layers[1].mlp.down_proj.bias is not None and plain.model.layers[1].mlp.up_proj.bias is None
    assert close(logits(plain, x), want)


def test_safe_merge_with_a_nan_delta_changes_nothing():
    base = tiny_llama()
    model = _model(copy.deepcopy(base), target_modules=["q_proj"])
    with torch.no_grad():
        hosts(model)["model.layers.0.self_attn.q_proj"].adapters["a"].bitfit_bias[0] = float("nan")
    keys = set(model.state_dict())
    with pytest.raises(NonFiniteWeightError):
        model.merge(safe=True)
    assert set(model.state_dict()) == keys and not any(h.merged for h in hosts(model).values())


def test_config_errors_and_registry():
    with pytest.raises(ConfigError) as info:
        BitFitConfig(target_modules=["q"], bias="all")
    assert info.value.field == "bias"
    with pytest.raises(ConfigError) as info:
        BitFitConfig(target_modules=["q"], init_weights="no")
    assert info.value.field == "init_weights"
    with pytest.raises(UnsupportedLayerError):
        _model(nn.Sequential(nn.Embedding(8, 4)), target_modules=["0"])
    assert config_for_peft_type("BITFIT") is BitFitConfig and BitFitConfig().method == "bitfit"

"""ResLoRA (spec 1.16): res_bs / res_is / res_ms against a slow twin, chaining, merges, checkpoints, config errors.

The twin recomputes every layer's shortcut from the spec's formulas with plain tensor algebra.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig, MergeError, PeftkitError
from peftkit.methods.reslora import WINDOW, ResLoraConfig, ResLoraIsConfig, ResLoraMsAdapter, ResLoraMsConfig, chain_key

from ._helpers import tiny_gpt2, token_ids

D, R, ALPHA, LAYERS = 8, 4, 8.0, 3
S = ALPHA / R
MODES = ["bs", "is", "ms"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)


class Stack(nn.Module):
    """x_{l+1} = tanh(proj_l(x_l)): each layer's input depends on the previous layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = torch.tanh(block.proj(x))
        return x


class Fan(Stack):
    """Layer l sees c^l x (a constant norm ratio 1/c between consecutive layers); the outputs add linearly."""

    c = 1.7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block.proj(x * self.c**i) for i, block in enumerate(self.layers))


def build(cls=Stack, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().double().eval()


def wrap(base: nn.Module, mode: str, p: int = 1, seed: int = 5, **kw) -> AdapterModel:
    """A ResLoRA model with seeded non-zero factors (B random too, so every shortcut shows)."""
    cfg = dict(target_modules=["proj"], r=R, lora_alpha=ALPHA, lora_dropout=0.0, reslora_mode=mode,
               reslora_pre_num=p) | kw
    model = AdapterModel(base)
    model.add_adapter("default", ResLoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model):
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g, dtype=torch.float64) * 0.5)
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g, dtype=torch.float64) * 0.5)
    return model


def adapters(model: AdapterModel, name: str = "default") -> list:
    return [model.model.get_submodule(f"layers.{i}.proj").adapters[name] for i in range(LAYERS)]


def twin(base: nn.Module, ads: list, x: torch.Tensor, mode: str, p: int) -> torch.Tensor:
    """Stack forward with the spec's shortcuts written out (layer l reaches layers max(0, l-p) .. l-1)."""
    xs, hs, h = [], [], x
    for i, block in enumerate(base.layers):
        a, b = ads[i].lora_A, ads[i].lora_B
        prev = range(max(0, i - p), i)
        if mode == "bs":
            d = sum(S * h @ ads[k].lora_A.T @ ads[k].lora_B.T for k in [i, *prev])
        elif mode == "is":
            d = S * (h + sum((xs[k] for k in prev), torch.zeros_like(h))) @ a.T @ b.T
        else:
            hl = h @ a.T
            d = S * (hl + sum((hs[k] for k in prev), torch.zeros_like(hl))) @ b.T
        xs.append(h)
        hs.append(h @ a.T)
        h = torch.tanh(h @ block.proj.weight.T + block.proj.bias + d)
    return h


def batch(seed: int = 1, n: int = 5) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_twin(mode, p):
    base = build()
    model = wrap(copy.deepcopy(base), mode, p)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(base, adapters(model), x, mode, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_twin(mode):
    """Gradients reach the earlier layers' factors (bs) and the earlier layers' inputs (is, ms) as in the twin."""
    base = build()
    model = wrap(copy.deepcopy(base), mode, p=2)
    ads = adapters(model)
    params = [t for a in ads for t in (a.lora_A, a.lora_B)]
    x1, x2 = batch().requires_grad_(), batch().requires_grad_()
    got = torch.autograd.grad(model(x1).square().sum(), [*params, x1])
    want = torch.autograd.grad(twin(base, ads, x2, mode, 2).square().sum(), [*params, x2])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if mode == "bs":  # layer 0's factors get gradient from layers 1 and 2 too: differs from plain LoRA
        lora = torch.autograd.grad(twin(base, ads, x2, mode, 0).square().sum(), ads[0].lora_B)[0]
        assert not torch.allclose(got[1], lora)


@pytest.mark.parametrize("mode", MODES)
def test_pre_num_zero_is_exactly_lora(mode):
    base = build()
    res = wrap(copy.deepcopy(base), mode, p=0)
    lora = AdapterModel(copy.deepcopy(base))
    lora.add_adapter("default", LoraConfig(target_modules=["proj"], r=R, lora_alpha=ALPHA))
    with torch.no_grad():
        for a, b in zip(adapters(res), adapters(lora), strict=True):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
    assert all(a._prev == () and a._chain is None for a in adapters(res))
    x = batch()
    with torch.no_grad():
        assert torch.equal(res(x), lora(x))


def test_identity_at_init_with_default_init():
    for mode in MODES:
        base = build()
        model = AdapterModel(copy.deepcopy(base))
        model.add_adapter("default", ResLoraConfig(target_modules=["proj"], r=R, reslora_mode=mode))
        with torch.no_grad():
            assert torch.equal(model(batch()), base(batch()))


class CheckpointedStack(Stack):
    """Stack with non-reentrant activation checkpointing per block (as transformers' gradient checkpointing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = checkpoint(lambda t, blk=block: torch.tanh(blk.proj(t)), x, use_reentrant=False)
        return x


@pytest.mark.parametrize("mode", MODES)
def test_non_reentrant_checkpointing_keeps_values_and_gradients(mode):
    plain, ckpt = wrap(build(), mode, p=2), wrap(build(CheckpointedStack), mode, p=2)
    grads = []
    for model in (plain, ckpt):
        model.train()
        x = batch().requires_grad_()
        params = [t for a in adapters(model) for t in (a.lora_A, a.lora_B)]
        grads.append(torch.autograd.grad(model(x).square().sum(), [*params, x]))
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------- chaining


def test_chain_key_masks_the_layer_index():
    assert chain_key("model.layers.3.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert chain_key("encoder.block.2.layer.1.wo") == "encoder.block.*.layer.1.wo"
    assert chain_key("lm_head") is None


def test_gpt2_chains_attn_and_mlp_c_proj_apart():
    model = AdapterModel(tiny_gpt2())
    model.add_adapter("default", ResLoraConfig(target_modules="all-linear", r=R, reslora_mode="is"))
    hosts = dict(model.hosts())
    for kind in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        first = hosts[f"transformer.h.0.{kind}"].adapters["default"]
        second = hosts[f"transformer.h.1.{kind}"].adapters["default"]
        assert second._prev == (first,) and first._prev == () and second._chain is first._chain
    with torch.no_grad():
        model(token_ids())  # shapes of chained inputs agree


def test_state_dict_holds_only_own_tensors():
    """The references to earlier layers are plain: no submodules, no duplicate keys, no cycles."""
    for mode in MODES:
        model = wrap(build(), mode, p=2)
        extra = {"reslora_norms", "reslora_count"} if mode != "bs" else set()
        for i, a in enumerate(adapters(model)):
            assert set(a.state_dict()) == {"lora_A", "lora_B"} | extra
            assert [n for n, _ in a.named_modules()] == ["", "dropout"]
            assert [q._pos for q in a._prev] == list(range(i - 1, max(-1, i - 3), -1))
        keys = [k for k in model.state_dict() if ".adapters." in k]
        assert len(keys) == LAYERS * (2 + len(extra)) and len(set(keys)) == len(keys)


def test_deepcopy_rewires_references_to_the_copy():
    model = wrap(build(), "is")
    with torch.no_grad():
        model(batch())
    clone = copy.deepcopy(model)
    ads, new = adapters(model), adapters(clone)
    assert new[1]._prev[0] is new[0] and new[1]._chain is new[0]._chain is not ads[0]._chain
    assert new[0]._chain.records == {}
    with torch.no_grad():
        assert torch.equal(clone(batch()), model(batch()))


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_out_of_order_call_raises(mode):
    model = wrap(build(), mode)
    host1 = model.model.get_submodule("layers.1.proj")
    with pytest.raises(PeftkitError, match="must run in order"):
        host1(batch())  # layer 0 did not run in this forward
    host0 = model.model.get_submodule("layers.0.proj")
    host0(batch(n=5))
    with pytest.raises(PeftkitError, match="must run in order"):
        host1(batch(n=3))  # layer 0 saw another shape


def test_adapters_start_in_the_base_mode():
    model = wrap(build(), "is")
    assert not any(a.training for a in adapters(model))
    model.train()
    assert all(a.training for a in adapters(model))


# ------------------------------------------------------------------------------------------------- merging


def test_bs_merged_equals_unmerged_and_delta_is_the_chain_sum():
    model = wrap(build(), "bs", p=2)
    ads = adapters(model)
    want = S * sum(a.lora_B.detach() @ a.lora_A.detach() for a in ads)
    torch.testing.assert_close(ads[2].delta_weight(), want.float(), rtol=1e-6, atol=1e-6)
    x = batch()
    with torch.no_grad():
        before = model(x)
        model.merge()
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
        model.unmerge()
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_approximate_merge_refused_without_opt_in(mode):
    model = wrap(build(), mode)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="reslora_approx_merge=True"):
        model.merge()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def train_batches(model: AdapterModel, n: int) -> list[torch.Tensor]:
    """n training-mode forwards on inputs of varying norm; returns the inputs."""
    model.train()
    xs = [batch(seed=100 + k) * (1 + k % 7) for k in range(n)]
    with torch.no_grad():
        for x in xs:
            model(x)
    model.eval()
    return xs


def test_norm_window_keeps_the_last_100_batches():
    model = wrap(build(Fan), "is")
    xs = train_batches(model, WINDOW + 23)
    a0 = adapters(model)[0]
    assert float(a0.reslora_count) == WINDOW + 23
    mean = float(a0.reslora_norms.sum() / WINDOW)
    assert mean == pytest.approx(sum(float(x.norm()) for x in xs[-WINDOW:]) / WINDOW, rel=1e-6)


def merge_diff(model: AdapterModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        before = model(x)
        model.merge()
        after = model(x)
        model.unmerge()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # the host merges in fp32
    return after - before


def test_is_merge_is_exact_under_a_constant_norm_ratio():
    """Fan: x_{l-j} = c^-j x_l, so alpha_l = sum_j c^-j and (1 + alpha_l) s B A x_l is the shortcut exactly."""
    model = wrap(build(Fan), "is", p=2, reslora_approx_merge=True)
    train_batches(model, 30)
    for i, a in enumerate(adapters(model)):
        assert a.merge_alpha() == pytest.approx(sum(Fan.c ** (k - i) for k in range(max(0, i - 2), i)), rel=1e-6)
    diff = merge_diff(model, batch(seed=9))
    assert diff.abs().max() < 1e-5


@pytest.mark.parametrize("shared_a", [False, True])
def test_ms_merge_error_is_the_closed_form(shared_a):
    """merged - unmerged = sum_l s B_l (alpha_l h_l - sum_j h_{l-j}), h_k = A_k x_k, alpha_l from the mean h-norms
    of the last training batches; zero when every layer has the same A (then h_{l-j} = c^-j h_l)."""
    model = wrap(build(Fan), "ms", p=2, reslora_approx_merge=True)
    ads, c = adapters(model), Fan.c
    if shared_a:
        with torch.no_grad():
            for a in ads[1:]:
                a.lora_A.copy_(ads[0].lora_A)
    xs = train_batches(model, 30)
    x = batch(seed=9)
    want = torch.zeros(x.shape[0], D, dtype=x.dtype)
    with torch.no_grad():
        mean = [sum(float((xb * c**k @ a.lora_A.T).norm()) for xb in xs) / len(xs) for k, a in enumerate(ads)]
        h = [x * c**k @ a.lora_A.T for k, a in enumerate(ads)]
        for i, a in enumerate(ads):
            prev = range(max(0, i - 2), i)
            alpha = sum(mean[k] / mean[i] for k in prev)
            want += S * (alpha * h[i] - sum((h[k] for k in prev), torch.zeros_like(h[i]))) @ a.lora_B.T
    diff = merge_diff(model, x)
    torch.testing.assert_close(diff, want, rtol=1e-4, atol=1e-5)
    assert (diff.abs().max() < 1e-5) == shared_a


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mode", MODES)
def test_save_load_reproduces_outputs_and_merge(mode, tmp_path):
    base = build(Fan)
    model = wrap(copy.deepcopy(base), mode, p=2, reslora_approx_merge=True)
    train_batches(model, 12)
    x = batch(seed=3)
    peftkit.save_adapter(model, tmp_path, "default")
    loaded = AdapterModel(copy.deepcopy(base))
    config = peftkit.load_adapter(loaded, tmp_path, "default")
    assert config == model.configs["default"] and config.method == model.configs["default"].method
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        model.merge()
        loaded.merge()
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("cls, method", [(ResLoraConfig, "reslora"), (ResLoraIsConfig, "reslora_is"),
                                         (ResLoraMsConfig, "reslora_ms")])
def test_mode_selects_the_method(cls, method):
    assert cls().method == method
    assert ResLoraConfig(reslora_mode=cls().reslora_mode).method == method
    assert peftkit.get_method(method).adapter_cls.method_name == method
    assert ("mergeable" in peftkit.get_method(method).adapter_cls.capabilities) == (method == "reslora")
    assert issubclass(peftkit.get_method("reslora_ms").adapter_cls, ResLoraMsAdapter)


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [
    ("reslora_mode", "xs"), ("reslora_pre_num", -1), ("reslora_pre_num", True), ("reslora_pre_num", 1.5),
    ("use_dora", True), ("lora_bias", True), ("init_lora_weights", "pissa"), ("r", 0),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        ResLoraConfig(**{field: value})

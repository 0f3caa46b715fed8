"""DiffoRA (spec 1.35): identity at init, the softmax-relaxed forward against a twin, theta moved only by the
validation loss (lr 0 in the weight step, autograd.grad in the architecture step), discretize keeps the top-rho
modules and the others give the base output, save -> load and merge after discretize."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, ConfigError, LoraConfig, MergeError, load_adapter, save_adapter
from peftkit.methods.diffora import (
    DifforaAdapter,
    DifforaConfig,
    architecture_step,
    discretize,
    theta_optimizer,
    theta_parameters,
    weight_parameters,
)
from peftkit.train.loop import _param_groups

from ._helpers import close, hosts, logits, perturb

TARGETS = ["q", "k", "up", "down"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(x)) * torch.sigmoid(self.k(x))  # (N, 16)
        return self.down(torch.tanh(self.up(h)))  # (N, 8)


def _base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _model(base: nn.Module | None = None, **cfg) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base if base is not None else _base()))
    model.add_adapter("default", DifforaConfig(**(dict(target_modules=TARGETS, r=4, lora_alpha=8) | cfg)))
    return model


def _adapters(model: AdapterModel) -> dict[str, DifforaAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 16, generator=g), torch.randn(12, 8, generator=g)


def _loss(model: AdapterModel, seed: int) -> torch.Tensor:
    x, y = _batch(seed)
    return (model(x) - y).square().mean()


def test_identity_at_init_and_half_weight():
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    assert torch.equal(logits(model, x), logits(base, x))
    assert all(float(a.selection_weight().detach()) == 0.5 for a in _adapters(model).values())


def test_relaxed_forward_matches_twin_and_merge():
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=3, scale=0.5)
    ad = _adapters(model)["up"]
    w = torch.softmax(ad.diffora_theta, 0)[0]
    twin = x @ base.up.weight.T + base.up.bias + w * ad.scaling * x @ (ad.lora_B @ ad.lora_A).T
    assert close(model.model.up(x), twin)
    y = logits(model, x)
    model.merge()
    assert close(logits(model, x), y)
    model.unmerge()
    assert torch.allclose(model.model.up.base_layer.weight, base.up.weight, atol=1e-6)


def test_weight_step_leaves_theta_and_validation_step_moves_only_theta():
    model = _model()
    perturb(model.named_parameters(), seed=3, scale=0.3)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt_w = torch.optim.AdamW(_param_groups(model, params, 1e-2), lr=1e-2)  # the training loop's groups
    thetas = theta_parameters(model)
    before = [t.detach().clone() for t in thetas]
    _loss(model, 1).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in thetas)  # the training loss reaches theta ...
    opt_w.step()
    assert all(torch.equal(t, b) for t, b in zip(thetas, before, strict=True))  # ... but lr 0 keeps it
    weights = weight_parameters(model)
    w_before = [p.detach().clone() for p in weights]
    g_before = [p.grad.clone() for p in weights]

    twin = copy.deepcopy(model)  # slow twin: d L_val / d theta by backward on a copy, then the same Adam step
    for p in twin.parameters():
        p.grad = None
    _loss(twin, 2).backward()
    twin_thetas = theta_parameters(twin)
    torch.optim.Adam(twin_thetas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3).step()

    architecture_step(model, _loss(model, 2), theta_optimizer(model))
    for t, tt, b in zip(thetas, twin_thetas, before, strict=True):
        assert not torch.equal(t, b)
        assert torch.allclose(t, tt, atol=1e-7)
        assert t.grad is None
    assert all(torch.equal(p, b) for p, b in zip(weights, w_before, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(weights, g_before, strict=True))  # weight grads untouched


def test_architecture_step_refuses_an_optimizer_holding_weights():
    model = _model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError) as e:
        architecture_step(model, _loss(model, 1), opt)
    assert e.value.field == "optimizer"


@pytest.mark.parametrize("rho,kept", [(0.5, 2), (0.25, 1), (1.0, 4), (0.1, 1)])
def test_discretize_keeps_the_top_modules_and_drops_the_rest(rho, kept):
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=4, scale=0.5)
    ads = _adapters(model)
    for i, p in enumerate(TARGETS):  # theta_on - theta_off: down > k > up > q
        ads[p].diffora_theta.data = torch.tensor([[0.1, 2.0, 1.0, 3.0][i], 0.0])
    paths = discretize(model, keep_ratio=rho)
    assert paths == {1: ["down"], 2: ["k", "down"], 4: TARGETS}[kept]  # top by theta, in model order
    for p, ad in ads.items():
        layer, inp = model.model.get_submodule(p), x if p != "down" else torch.randn(5, 24)
        base_out = base.get_submodule(p)(inp)
        if p in paths:
            assert close(layer(inp), base_out + ad.scaling * inp @ (ad.lora_B @ ad.lora_A).T)  # weight 1
        else:
            assert torch.equal(layer(inp), base_out)  # no adapter contribution at all
    with pytest.raises(ConfigError):
        discretize(model)


def test_save_load_and_merge_after_discretize(tmp_path):
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=5, scale=0.5)
    discretize(model)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = AdapterModel(copy.deepcopy(base))
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), want)
    assert [a.dropped for a in _adapters(fresh).values()] == [a.dropped for a in _adapters(model).values()]
    model.merge()
    assert close(logits(model, x), want)
    searching = _model(base)
    searching.merge()
    with pytest.raises(MergeError):
        discretize(searching)


def test_helpers_refuse_other_methods():
    model = AdapterModel(_base())
    model.add_adapter("default", LoraConfig(target_modules=TARGETS, r=2))
    with pytest.raises(ConfigError) as e:
        discretize(model)
    assert e.value.field == "name"


@pytest.mark.parametrize("kw,field", [(dict(diffora_keep_ratio=0.0), "diffora_keep_ratio"),
                                      (dict(diffora_keep_ratio=1.5), "diffora_keep_ratio"),
                                      (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
                                      (dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(r=0), "r")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        DifforaConfig(**kw)
    assert e.value.field == field

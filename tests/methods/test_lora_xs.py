"""LoRA-XS (spec 1.11): frozen U_r / S_r V_r^T, a trainable r x r R, exact merge, lowered form, round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError
from peftkit.methods.lora_xs import LoraXsConfig

from ._helpers import hosts, mixed, mixed_inputs

R = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def xs(base: nn.Module, targets=("fc1", "fc2"), **kw) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", LoraXsConfig(r=R, lora_alpha=6, target_modules=list(targets), **kw))
    return model


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def randomize_r(model: AdapterModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for host in hosts(model).values():
            host.adapters["default"].lora_xs_R.copy_(torch.randn(R, R, generator=g))


def test_factors_from_the_truncated_svd() -> None:
    base = net()
    model = xs(base)
    for path, host in hosts(model).items():
        ad = host.adapters["default"]
        b, a = ad.lora_xs_B.double(), ad.lora_xs_A.double()
        assert torch.allclose(b.T @ b, torch.eye(R, dtype=torch.float64), atol=1e-6)  # B^T B = I
        w = base.get_submodule(path).weight.detach().double()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        assert torch.allclose(b @ a, u[:, :R] @ torch.diag(sv[:R]) @ vh[:R], atol=1e-5)  # B A = best rank-r of W


def test_only_r_trains() -> None:
    model = xs(net())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_xs_R") for n in trainable)
    ad = hosts(model)["fc1"].adapters["default"]
    assert not ad.lora_xs_A.requires_grad and not ad.lora_xs_B.requires_grad
    assert {k.rsplit(".", 1)[-1] for k in ad.state_dict()} == {"lora_xs_A", "lora_xs_B", "lora_xs_R"}


def test_forward_closed_form_and_small_deviation_at_init() -> None:
    base = net()
    model = xs(base, targets=("fc1",))
    x = torch.randn(5, 12)
    ad = hosts(model)["fc1"].adapters["default"]
    deviation = (model.model.fc1(x) - base.fc1(x)).abs().max()
    assert 0 < deviation < 1e-3 * (1 + x.norm(dim=1).max())  # O(1e-5 * |x|) times ||S_r||, nonzero
    randomize_r(model)
    fc1 = base.fc1
    expected = x @ fc1.weight.T + fc1.bias + 2.0 * x @ ad.lora_xs_A.T @ ad.lora_xs_R.T @ ad.lora_xs_B.T
    assert torch.allclose(model.model.fc1(x), expected, atol=1e-5)


def test_gradient_of_r_closed_form() -> None:
    """dL/dR = s B^T G A^T for G = dL/dW."""
    model = xs(net(), targets=("fc1",))
    ad = hosts(model)["fc1"].adapters["default"]
    x, gy = torch.randn(6, 12), torch.randn(6, 20)
    (model.model.fc1(x) * gy).sum().backward()
    g = gy.T @ x  # (out, in)
    assert torch.allclose(ad.lora_xs_R.grad, 2.0 * ad.lora_xs_B.T @ g @ ad.lora_xs_A.T, atol=1e-4)


def test_delta_rank_merge_and_lowered() -> None:
    model = xs(net())
    randomize_r(model)
    x = torch.randn(5, 12)
    unmerged = model(x).detach()
    for host in hosts(model).values():
        ad = host.adapters["default"]
        assert torch.linalg.matrix_rank(ad.delta_weight().detach().double(), rtol=1e-5) <= R
        low = ad.lowered()
        xin = torch.randn(4, host.ops.in_features)
        assert torch.allclose(low.scale * host.ops.up(host.ops.down(xin, low.a), low.b), ad(xin, None), atol=1e-5)
    model.merge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    model.unmerge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)


def test_embedding_and_conv_geometry() -> None:
    base = mixed()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", LoraXsConfig(r=2, lora_alpha=2, target_modules=["emb", "fc1", "conv"]))
    for host in hosts(model).values():
        host.adapters["default"].lora_xs_R.data.normal_(0, 0.5)
    ids, img = mixed_inputs()
    unmerged = model(ids, img).detach()
    assert not torch.allclose(unmerged, base(ids, img), atol=1e-3)
    model.merge()
    assert torch.allclose(model(ids, img), unmerged, atol=1e-5)


def test_save_load_reproduces(tmp_path) -> None:
    base = net()
    model = xs(base)
    randomize_r(model)
    x = torch.randn(5, 12)
    peftkit.save_adapter(model, tmp_path)
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert loaded.configs["default"] == model.configs["default"]


@pytest.mark.parametrize("kw,field", [({"r": 0}, "r"), ({"lora_alpha": 0}, "lora_alpha"),
                                      ({"lora_dropout": 1.0}, "lora_dropout"), ({"init_std": -1.0}, "init_std")])
def test_bad_config_names_the_field(kw, field) -> None:
    with pytest.raises(ConfigError) as info:
        LoraXsConfig(**kw)
    assert info.value.field == field


def test_rank_above_the_layer_is_refused() -> None:
    model = AdapterModel(net())
    with pytest.raises(ConfigError) as info:
        model.add_adapter("default", LoraXsConfig(r=9, target_modules=["fc2"]))
    assert info.value.field == "r" and not hosts(model)

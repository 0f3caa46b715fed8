"""SVFit (spec 1.19): only the top-r singular values train; identity at init; rank-r update; energy utility."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError
from peftkit.methods.svfit import SvfitConfig, energy_rank

from ._helpers import close, hosts, perturb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 6)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) + self.conv(img).mean(dim=(2, 3)).sum(1, keepdim=True)


def svfit_net(r: int = 3) -> tuple[AdapterModel, nn.Module]:
    torch.manual_seed(0)
    base = Net()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", SvfitConfig(r=r, target_modules=["fc1", "fc2", "conv"]))
    return model, base


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(5, 12, generator=g), torch.randn(5, 3, 4, 4, generator=g)


def test_identity_at_init_and_sigma_starts_at_the_singular_values() -> None:
    model, base = svfit_net()
    assert torch.equal(model(*inputs()), base(*inputs()))
    ad = hosts(model)["fc1"].adapters["default"]
    s = torch.linalg.svdvals(base.fc1.weight.detach().double())
    assert torch.allclose(ad.svfit_sigma.detach().double(), s[:3], rtol=1e-5)


def test_update_is_u_r_diag_sigma_minus_sigma0_v_r() -> None:
    """W' = W_e + U_r diag(sigma) V_r^T with W_e = W - U_r S_r V_r^T, from an independent fp64 SVD."""
    model, base = svfit_net()
    perturb(model.named_parameters(), seed=2, scale=0.5)
    x, _ = inputs()
    ad = hosts(model)["fc1"].adapters["default"]
    w = base.fc1.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sigma = ad.svfit_sigma.detach().double()
    w_e = w - u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    w_new = w_e + u[:, :3] @ torch.diag(sigma) @ vh[:3]
    delta = ad.delta_weight().double()
    assert torch.allclose(delta, w_new - w, atol=1e-5)
    assert torch.linalg.matrix_rank(delta, rtol=1e-6).item() <= 3
    assert close(hosts(model)["fc1"](x), x.double() @ w_new.T + base.fc1.bias.double())


def test_conv_layers_scale_the_singular_values_of_the_flattened_kernel() -> None:
    model, base = svfit_net()
    perturb(model.named_parameters(), seed=3, scale=0.5)
    _, img = inputs()
    host = hosts(model)["conv"]
    merged = copy.deepcopy(base.conv)
    with torch.no_grad():
        merged.weight += host.adapters["default"].delta_weight().reshape(merged.weight.shape)
    assert close(host(img), merged(img))


def test_only_sigma_has_gradients() -> None:
    model, _ = svfit_net()
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"svfit_sigma"}
    model(*inputs()).square().sum().backward()
    ads = [h.adapters["default"] for h in hosts(model).values()]
    assert all(ad.svfit_sigma.grad.abs().max() > 0 for ad in ads)
    assert all(ad.svfit_U.grad is None for ad in ads)


def test_rank_clamps_to_the_layer() -> None:
    model, _ = svfit_net(r=16)
    assert [h.adapters["default"].svfit_sigma.numel() for h in hosts(model).values()] == [12, 6, 5]


def test_save_load_needs_no_svd_and_round_trips(tmp_path) -> None:
    model, base = svfit_net()
    perturb(model.named_parameters(), seed=5, scale=0.5)
    out = model(*inputs()).detach()
    peftkit.save_adapter(model, tmp_path)
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded(*inputs()), out)
    model.merge()
    model.unmerge()
    model.delete_adapter("default")
    assert close(model(*inputs()), base(*inputs()), rel=1e-6)


def test_energy_rank_matches_a_slow_twin() -> None:
    w = torch.randn(9, 7, generator=torch.Generator().manual_seed(6)) @ torch.diag(torch.logspace(0, -2, 7))
    e = torch.linalg.svdvals(w.double()) ** 2
    for threshold in (0.5, 0.9, 0.99, 1.0):
        want = next(r for r in range(1, 8) if e[:r].sum() >= threshold * e.sum() - 1e-9)
        assert energy_rank(w, threshold) == want
    with pytest.raises(ConfigError):
        energy_rank(w, 0.0)


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank_names_the_field(r) -> None:
    with pytest.raises(ConfigError) as info:
        SvfitConfig(r=r)
    assert info.value.field == "r"

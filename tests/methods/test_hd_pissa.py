"""HD-PiSSA (spec 1.10, single-machine reading): sharded principal factors, per-step merge into W, invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig, UnsupportedLayerError
from peftkit.methods.hd_pissa import HdPissaConfig

from ._helpers import hosts

PATHS = ("fc1", "fc2")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def batch(seed: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 12, generator=g), torch.randn(rows, 8, generator=g)


def loss(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    return (model(x) - y).square().sum()


def hd(k: int = 2, r: int = 2, alpha: float | None = None, seed: int = 0) -> tuple[AdapterModel, Net]:
    torch.manual_seed(seed)
    base = Net()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", HdPissaConfig(r=r, lora_alpha=alpha, hd_shards=k, target_modules=list(PATHS)))
    return model, base


def weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {p: h.base_layer.weight.detach().double().clone() for p, h in hosts(model).items()}


def step(model: AdapterModel, opt: torch.optim.Optimizer, seed: int, fold: bool = True) -> None:
    opt.zero_grad()
    loss(model, seed).backward()
    opt.step()
    if fold:
        model.step_hook(seed, opt)


def params(model: AdapterModel) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------ init


def test_init_factors_and_exact_identity() -> None:
    model, base = hd(k=2, r=2)
    x = batch(1)[0]
    assert torch.equal(model(x), base(x))  # the contribution is exactly zero, the base is untouched
    for path, host in hosts(model).items():
        ad = host.adapters["default"]
        w = base.get_submodule(path).weight.detach().double()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        for k in range(2):
            sl = slice(2 * k, 2 * k + 2)
            shard = ad.hd_B[k].double() @ ad.hd_A[k].double()  # B_k A_k = U_k S_k V_k^T
            assert torch.allclose(shard, u[:, sl] @ torch.diag(sv[sl]) @ vh[sl], atol=1e-5)
        assert torch.equal(ad.hd_A, ad.hd_A0) and torch.equal(ad.hd_B, ad.hd_B0)
        assert torch.equal(host.base_layer.weight, base.get_submodule(path).weight)


def test_shard_gradients_come_from_their_micro_batch() -> None:
    """g_B_k = a' G_k A_k^T and g_A_k = a' B_k^T G_k, G_k = dL/dW on rows [k N/K, (k+1) N/K) only."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 8)
    model = AdapterModel(nn.Sequential(lin))
    model.add_adapter("default", HdPissaConfig(r=2, lora_alpha=3, hd_shards=2, target_modules=["0"]))
    ad = hosts(model)["0"].adapters["default"]
    x = torch.randn(3, 2, 12, requires_grad=True)  # (B, T, in) with B % K != 0: token rows split 3 + 3
    gy = torch.randn(3, 2, 8)
    (model(x) * gy).sum().backward()
    assert torch.allclose(x.grad, gy @ lin.weight.detach(), atol=1e-6)  # the input gradient is the base's
    xr, gr = x.detach().reshape(6, 12), gy.reshape(6, 8)
    for k, rows in enumerate((slice(0, 3), slice(3, 6))):
        g = gr[rows].T @ xr[rows]  # (out, in)
        assert torch.allclose(ad.hd_B.grad[k], 1.5 * g @ ad.hd_A[k].detach().T, atol=1e-5)
        assert torch.allclose(ad.hd_A.grad[k], 1.5 * ad.hd_B[k].detach().T @ g, atol=1e-5)


# ------------------------------------------------------------------------------------------------ steps


def test_per_step_update_rank_and_shards_reset() -> None:
    model, _ = hd(k=2, r=2)
    opt = torch.optim.Adam(params(model), lr=1e-2)
    originals = {p: (h.adapters["default"].hd_A0.clone(), h.adapters["default"].hd_B0.clone())
                 for p, h in hosts(model).items()}
    for t in range(3):
        before = weights(model)
        step(model, opt, seed=t)
        for path, w in weights(model).items():
            diff = w - before[path]
            assert diff.abs().max() > 1e-6, "the step did not reach W"
            assert torch.linalg.matrix_rank(diff, rtol=1e-6) <= 2 * 2 * 2  # 2Kr (the spec bounds it by 3Kr)
        for path, host in hosts(model).items():
            ad = host.adapters["default"]
            assert torch.equal(ad.hd_A, originals[path][0]) and torch.equal(ad.hd_B, originals[path][1])
    assert all(len(opt.state[p]) > 0 and opt.state[p]["step"] == 3 for p in params(model))  # Adam state kept


def test_first_order_updates_stay_in_the_principal_subspaces() -> None:
    """SGD, second-order terms a' dB_k dA_k taken out: (I - P_U)(W_t - W_0)(I - P_V) = 0 (P: top-Kr spaces)."""
    k, r = 2, 2
    model, base = hd(k=k, r=r)
    opt = torch.optim.SGD(params(model), lr=1e-2)
    w0 = weights(model)
    second = {p: torch.zeros_like(w) for p, w in w0.items()}
    for t in range(3):
        step(model, opt, seed=t, fold=False)
        for path, host in hosts(model).items():
            ad = host.adapters["default"]
            da, db = (ad.hd_A - ad.hd_A0).double(), (ad.hd_B - ad.hd_B0).double()  # (K, r, in), (K, out, r)
            second[path] += ad.scaling * torch.einsum("kor,kri->oi", db, da)
        model.step_hook(t, opt)
    for path, w in weights(model).items():
        u, _, vh = torch.linalg.svd(w0[path], full_matrices=False)
        pu, pv = u[:, :k * r] @ u[:, :k * r].T, vh[:k * r].T @ vh[:k * r]
        first = w - w0[path] - second[path]
        eye_o, eye_i = torch.eye(pu.shape[0], dtype=w.dtype), torch.eye(pv.shape[0], dtype=w.dtype)
        assert (w - w0[path]).abs().max() > 1e-4
        assert ((eye_o - pu) @ first @ (eye_i - pv)).abs().max() < 1e-5
        assert ((eye_o - pu) @ (w - w0[path]) @ (eye_i - pv)).abs().max() > 1e-9  # the dropped term is real


def test_k1_sgd_step_equals_pissa_step_then_merge() -> None:
    model, base = hd(k=1, r=3, alpha=3)  # a' = 1, PiSSA with s = 1 has the same factors
    pissa = AdapterModel(copy.deepcopy(base))
    pissa.add_adapter("default", LoraConfig(r=3, lora_alpha=3, init_lora_weights="pissa", target_modules=list(PATHS)))
    for m in (model, pissa):
        step(m, torch.optim.SGD(params(m), lr=0.05), seed=4)
    pissa.merge()
    for path, w in weights(model).items():
        assert torch.allclose(w, weights(pissa)[path], atol=1e-5)


# ------------------------------------------------------------------------------------ state and lifecycle


def trained(k: int = 2) -> tuple[AdapterModel, Net]:
    model, base = hd(k=k)
    opt = torch.optim.Adam(params(model), lr=1e-2)
    for t in range(3):
        step(model, opt, seed=t)
    return model, base


def test_delete_restores_the_original_weight() -> None:
    model, base = trained()
    x = batch(9)[0]
    assert not torch.allclose(model(x), base(x), atol=1e-3)
    model.delete_adapter("default")
    for path in PATHS:
        assert torch.allclose(model.model.get_submodule(path).weight, base.get_submodule(path).weight, atol=1e-6)


def test_save_load_on_the_original_base_reproduces_training(tmp_path) -> None:
    model, base = trained()
    x = batch(9)[0]
    peftkit.save_adapter(model, tmp_path)
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    ad, ad_loaded = hosts(model)["fc1"].adapters["default"], hosts(loaded)["fc1"].adapters["default"]
    assert torch.equal(ad.hd_delta, ad_loaded.hd_delta) and torch.equal(ad.hd_A0, ad_loaded.hd_A0)
    loaded.delete_adapter("default")
    assert torch.allclose(loaded(x), base(x), atol=1e-5)


def test_merge_between_step_and_fold_is_exact() -> None:
    model, _ = hd()
    step(model, torch.optim.SGD(params(model), lr=1e-2), seed=0, fold=False)
    x = batch(9)[0]
    unmerged = model(x).detach()
    assert hosts(model)["fc1"].adapters["default"].delta_weight().abs().max() > 1e-6
    model.merge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    model.unmerge()
    model.step_hook(1)  # folding moves the same delta into W
    assert torch.allclose(model(x), unmerged, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kw,field", [({"hd_shards": 0}, "hd_shards"), ({"hd_shards": 1.5}, "hd_shards"),
                                      ({"r": 0}, "r"), ({"lora_alpha": -1}, "lora_alpha")])
def test_bad_config_names_the_field(kw, field) -> None:
    with pytest.raises(ConfigError) as info:
        HdPissaConfig(**kw)
    assert info.value.field == field


def test_too_many_shards_for_a_layer() -> None:
    model = AdapterModel(Net())
    with pytest.raises(ConfigError) as info:
        model.add_adapter("default", HdPissaConfig(r=3, hd_shards=3, target_modules=["fc2"]))  # 9 > min(8, 20)
    assert info.value.field == "hd_shards" and not hosts(model)


def test_conv_is_unsupported() -> None:
    model = AdapterModel(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(UnsupportedLayerError):
        model.add_adapter("default", HdPissaConfig(r=2, target_modules=["0"]))

"""SVFT (spec 1.18): sparse M over W's singular vectors, the four patterns, the gate, save/load onto the base."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, CheckpointError, ConfigError
from peftkit.methods.svft import SvftConfig, canonical_svd, pattern_size, svft_pattern

from ._helpers import close, hosts, perturb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.sq = nn.Linear(12, 20), nn.Linear(20, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sq(self.fc2(torch.tanh(self.fc1(x))))


def svft_net(seed: int = 0, **kw) -> tuple[AdapterModel, nn.Module]:
    torch.manual_seed(seed)
    base = Net()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", SvftConfig(target_modules=["fc1", "fc2", "sq"], **kw))
    return model, base


def x_in() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(4))


def dense_twin(ad) -> torch.Tensor:
    """sigmoid(g) M as a dense matrix, entry by entry."""
    n = ad.n
    m = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), v in zip(ad.svft_index.T.tolist(), ad.svft_m.detach().double().tolist(), strict=True):
        m[i, j] += v
    return torch.sigmoid(ad.svft_gate.detach().double()) * m


# --------------------------------------------------------------------------------------------- the update


def test_zero_m_is_an_exact_identity() -> None:
    model, base = svft_net()
    x = x_in()
    assert torch.equal(model(x), base(x))
    for host in hosts(model).values():
        assert host.adapters["default"].delta_weight().abs().max() == 0


def test_forward_equals_u_sigma_plus_gated_m_v() -> None:
    """n = k: W' = U (S + sigmoid(g) M) V^T, the paper's form, from an independent fp64 SVD."""
    model, base = svft_net(pattern="banded", off_diag=1)
    perturb(model.named_parameters(), seed=3, scale=0.5)
    x = x_in()
    h = torch.tanh(base.fc1(x))
    for path, inp in (("fc1", x), ("fc2", h)):
        ad = hosts(model)[path].adapters["default"]
        w = base.get_submodule(path).weight.detach().double()
        u, s, vh = canonical_svd(w)  # sign-canonical: the same coordinates M was trained in
        u, s, vh = u.double(), s.double(), vh.double()
        w_new = u @ (torch.diag(s) + dense_twin(ad)) @ vh
        assert torch.allclose(ad.delta_weight().double(), w_new - w, atol=1e-5)
        want = inp.double() @ w_new.T + base.get_submodule(path).bias.double()
        assert close(hosts(model)[path](inp), want)


def test_truncated_update_has_rank_n_and_lives_in_the_top_n_subspaces() -> None:
    model, base = svft_net(rank=3, pattern="banded", off_diag=1)
    perturb(model.named_parameters(), seed=4, scale=0.5)
    ad = hosts(model)["fc1"].adapters["default"]
    d = ad.delta_weight().double()  # (20, 12)
    u, _, vh = torch.linalg.svd(base.fc1.weight.detach().double(), full_matrices=False)
    pu, pv = u[:, :3] @ u[:, :3].T, vh[:3].T @ vh[:3]
    assert torch.linalg.matrix_rank(d, rtol=1e-6).item() <= 3
    assert torch.allclose(pu @ d, d, atol=1e-5) and torch.allclose(d @ pv, d, atol=1e-5)


def test_only_m_and_the_gate_train() -> None:
    model, _ = svft_net()
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"svft_m", "svft_gate"}
    model(x_in()).square().sum().backward()
    ad = hosts(model)["fc1"].adapters["default"]
    assert ad.svft_m.grad.abs().max() > 0 and ad.svft_gate.grad.abs().max() == 0  # M = 0: no gate signal yet


def test_kaiming_init_moves_the_output_a_little() -> None:
    model, base = svft_net(seed=1, init_m="kaiming", pattern="random")
    ad = hosts(model)["fc1"].adapters["default"]
    size = ad.svft_m.numel()
    assert size == pattern_size(12, 2)
    assert 0.5 * math.sqrt(2 / size) < ad.svft_m.detach().std().item() < 1.5 * math.sqrt(2 / size)
    x = x_in()
    assert not torch.equal(model(x), base(x))


# ---------------------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("n,d", [(6, 0), (6, 2), (5, 4), (4, 9)])
def test_banded_and_plain_pattern_sizes(n, d) -> None:
    idx = svft_pattern("banded", n, d)
    dd = min(d, n - 1)
    assert idx.shape == (2, n * (2 * dd + 1) - dd * (dd + 1))
    assert ((idx[0] - idx[1]).abs() <= dd).all()
    assert len(set(map(tuple, idx.T.tolist()))) == idx.shape[1]
    plain = svft_pattern("plain", n, d)
    assert torch.equal(plain, torch.stack([torch.arange(n), torch.arange(n)]))


def test_random_pattern_has_the_banded_count_of_distinct_entries() -> None:
    torch.manual_seed(0)
    idx = svft_pattern("random", 8, 2)
    assert idx.shape == (2, pattern_size(8, 2))
    assert len(set(map(tuple, idx.T.tolist()))) == idx.shape[1]
    assert (idx >= 0).all() and (idx < 8).all()
    assert not torch.equal(idx, svft_pattern("banded", 8, 2))


def test_top_k_picks_the_largest_alignment_entries() -> None:
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    u, _, vh = canonical_svd(w)
    idx = svft_pattern("top_k", 6, 1, u, vh)
    coeffs = u @ vh.T
    chosen = coeffs[idx[0], idx[1]]
    rest = torch.ones(6, 6, dtype=torch.bool)
    rest[idx[0], idx[1]] = False
    assert idx.shape == (2, pattern_size(6, 1)) and chosen.min() >= coeffs[rest].max()
    wide = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))  # U is the square factor
    u, _, vh = canonical_svd(wide)
    idx = svft_pattern("top_k", 4, 0, u, vh)
    assert idx.shape == (2, 4)
    assert torch.equal(u[idx[0], idx[1]].sort().values, torch.topk(u.reshape(-1), 4).values.sort().values)


def test_canonical_svd_is_deterministic_and_reconstructs() -> None:
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(5))
    u, s, vh = canonical_svd(w)
    assert torch.allclose(u @ torch.diag(s) @ vh, w, atol=1e-5)
    assert (u.gather(0, u.abs().argmax(0, keepdim=True)) > 0).all()
    u2, _, vh2 = canonical_svd(-w)  # flipping W flips exactly one factor per triplet: V follows the rule on U
    assert torch.allclose(u2, u, atol=1e-5) and torch.allclose(vh2, -vh, atol=1e-5)


# ------------------------------------------------------------------------------------------ save and load


def test_save_load_onto_a_fresh_base_and_refuse_another_base(tmp_path) -> None:
    model, base = svft_net(pattern="random", rank=4)
    perturb(model.named_parameters(), seed=6, scale=0.5)
    x = x_in()
    out = model(x).detach()
    peftkit.save_adapter(model, tmp_path)
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded(x), out)
    torch.manual_seed(99)
    with pytest.raises(CheckpointError, match="singular values differ"):
        peftkit.load_adapter(AdapterModel(Net()), tmp_path)


def test_delete_restores_the_base() -> None:
    model, base = svft_net()
    perturb(model.named_parameters(), seed=7)
    model.merge()
    model.unmerge()
    model.delete_adapter("default")
    x = x_in()
    assert close(model(x), base(x), rel=1e-6)


@pytest.mark.parametrize("kw,field", [({"rank": 0}, "rank"), ({"pattern": "diag"}, "pattern"),
                                      ({"off_diag": -1}, "off_diag"), ({"off_diag": 1.5}, "off_diag"),
                                      ({"init_m": "normal"}, "init_m")])
def test_bad_config_names_the_field(kw, field) -> None:
    with pytest.raises(ConfigError) as info:
        SvftConfig(**kw)
    assert info.value.field == field

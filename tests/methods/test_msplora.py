"""MSPLoRA (spec 1.15): the pyramid's sharing (global across all layers, mid-level within contiguous thirds, local
per layer), group assignment, identity at init, the closed form sum_l (alpha / r_l) B_l A_l, shared gradients =
the sum over layers (untied slow twin), merge, save -> load, parameter count and clear config errors.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError
from peftkit.methods.msplora import MSPLoraAdapter, MSPLoraConfig, level_groups

from ._helpers import hosts, perturb

LAYERS, D = 6, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.o = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(torch.tanh(self.v(x))) * torch.sigmoid(self.q(x).mean(-1, keepdim=True))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _model(seed: int | None = 5, targets=("q", "v", "o", "head"), **kw) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(Stack())
    model.add_adapter("default", MSPLoraConfig(target_modules=list(targets), **{**dict(r=8, lora_alpha=4), **kw}))
    if seed is not None:
        perturb(model.named_parameters(), seed=seed, scale=0.3)
    return model


def _ads(model: AdapterModel) -> dict[str, MSPLoraAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _x() -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))


def test_group_assignment_for_six_layers():
    assert [level_groups(p, 6, 3)[1] for p in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [level_groups(p, 6, 3) for p in (0, 5)] == [[0, 0, 0], [0, 2, 5]]
    assert [level_groups(p, 9, 4)[2] for p in range(9)] == list(range(9))  # 3^2 groups, capped at 9 layers
    assert [level_groups(p, 2, 3)[1] for p in range(2)] == [0, 1]


def test_sharing_follows_the_pyramid():
    ads = _ads(_model(seed=None))
    q = [ads[f"layers.{i}.q"] for i in range(LAYERS)]
    assert all(a.msplora_A0 is q[0].msplora_A0 and a.msplora_B0 is q[0].msplora_B0 for a in q)
    assert q[0].msplora_A0.data_ptr() == q[5].msplora_A0.data_ptr()
    mids = [id(a.msplora_A1) for a in q]
    assert mids[0] == mids[1] != mids[2] == mids[3] != mids[4] == mids[5] != mids[0]
    assert len({id(a.msplora_A2) for a in q}) == LAYERS
    assert q[0].msplora_A0 is not ads["layers.0.v"].msplora_A0  # per module type
    ranks = [tuple(getattr(q[0], f"msplora_A{lv}").shape) for lv in range(3)]
    assert ranks == [(8, D), (4, D), (2, D)]


def test_module_without_layer_index_has_global_and_local_only():
    head = _ads(_model(seed=None))["head"]
    assert head.levels == [0, 2] and not hasattr(head, "msplora_A1")
    single = _ads(_model(seed=None, msp_levels=1))
    assert single["head"].levels == [0] and single["head"].disk_names() == {}
    assert single["layers.0.q"].msplora_A0 is single["layers.5.q"].msplora_A0


def test_identity_at_init_and_lora_init_per_level():
    model = _model(seed=None)
    x = _x()
    with model.disabled():
        base = model(x)
    assert torch.equal(model(x), base)
    ad = _ads(model)["layers.3.v"]
    for lv in range(3):
        a, b = getattr(ad, f"msplora_A{lv}"), getattr(ad, f"msplora_B{lv}")
        assert torch.equal(b, torch.zeros_like(b)) and a.abs().max() <= 1 / D**0.5 and a.abs().sum() > 0


def test_forward_and_delta_match_the_closed_form():
    model = _model()
    host, ad = hosts(model)["layers.2.v"], _ads(model)["layers.2.v"]
    x = _x()
    want = host.base_layer(x)
    delta = torch.zeros(2 * D, D)
    for lv, r_l in enumerate((8, 4, 2)):
        a, b = getattr(ad, f"msplora_A{lv}").detach(), getattr(ad, f"msplora_B{lv}").detach()
        want = want + (4 / r_l) * x @ a.T @ b.T
        delta += (4 / r_l) * b @ a
    torch.testing.assert_close(host(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ad.delta_weight(), delta, atol=1e-6, rtol=1e-5)
    low = ad.lowered()
    torch.testing.assert_close(low.scale * low.b @ low.a, delta, atol=1e-6, rtol=1e-5)


def test_shared_gradients_are_the_sum_of_per_layer_contributions():
    x = _x()
    model = _model()
    model(x).square().mean().backward()
    twin = _model()  # same seeds and values; untie every shared level into one copy per layer
    for ad in _ads(twin).values():
        for lv in (0, 1):
            if hasattr(ad, f"msplora_A{lv}"):
                setattr(ad, f"msplora_A{lv}", nn.Parameter(getattr(ad, f"msplora_A{lv}").detach().clone()))
    twin(x).square().mean().backward()
    ours, theirs = _ads(model), _ads(twin)
    torch.testing.assert_close(ours["layers.0.q"].msplora_A0.grad,
                               sum(theirs[f"layers.{i}.q"].msplora_A0.grad for i in range(LAYERS)),
                               atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(ours["layers.2.o"].msplora_A1.grad,
                               theirs["layers.2.o"].msplora_A1.grad + theirs["layers.3.o"].msplora_A1.grad,
                               atol=1e-7, rtol=1e-5)
    assert theirs["layers.2.o"].msplora_A1.grad.abs().sum() > 0


def test_merged_equals_unmerged_and_unmerge_restores():
    model, x = _model(), _x()
    want = model(x).detach()
    before = hosts(model)["layers.4.o"].base_layer.weight.detach().clone()
    model.merge()
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    model.unmerge()
    torch.testing.assert_close(hosts(model)["layers.4.o"].base_layer.weight, before, atol=1e-6, rtol=0)


def test_save_load_reproduces_and_writes_shared_pairs_once(tmp_path):
    model, x = _model(), _x()
    peftkit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    shared = [k for k in keys if k.startswith("base_model.msplora.")]
    # per type: global + 3 thirds, two tensors each; the head has its global pair only
    assert len(shared) == 3 * (1 + 3) * 2 + 2
    assert "base_model.msplora.q.8x8.level1.group2.lora_A" in shared
    assert len(keys) - len(shared) == (3 * LAYERS + 1) * 2  # local pairs
    torch.manual_seed(0)
    loaded = AdapterModel(Stack())
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded(x), model(x))
    ads = _ads(loaded)
    assert ads["layers.0.q"].msplora_A0 is ads["layers.5.q"].msplora_A0


def test_parameter_count_matches_the_spec_formula():
    model = _model(seed=None, targets=("q",))
    per_pair = 2 * D  # in + out
    assert model.param_report().trainable == 8 * per_pair + 3 * 4 * per_pair + LAYERS * 2 * per_pair


def test_same_name_different_shapes_do_not_share():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 16)))
    model = AdapterModel(net)
    model.add_adapter("default", MSPLoraConfig(target_modules=["0.0", "1.0"], r=4))
    ads = _ads(model)
    assert ads["0.0"].msplora_A0 is not ads["1.0"].msplora_A0


@pytest.mark.parametrize("kw,field", [(dict(r=6), "r"), (dict(r=4, msp_levels=4), "r"),
                                      (dict(msp_levels=0), "msp_levels"), (dict(msp_levels=2.0), "msp_levels"),
                                      (dict(lora_alpha=-1), "lora_alpha"), (dict(lora_dropout=1.5), "lora_dropout")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        MSPLoraConfig(target_modules=["q"], **kw)
    assert e.value.field == field

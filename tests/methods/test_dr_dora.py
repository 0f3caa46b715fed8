"""DynamicRank-DoRA (spec 1.36): identity at init with both factors kaiming, the gated forward / merge / lowered form
against twins, the relative-contribution importance, the cubic schedule of active components with one global
threshold, pruned gates staying zero, the variance regularizer (off after pruning), shrinking after pruning with
the optimizer following, and save -> load of the smaller shapes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, ConfigError, load_adapter, save_adapter
from peftkit.methods.dr_dora import DrDoraAdapter, DrDoraConfig

from ._helpers import close, hosts, logits, perturb

TARGETS = ["q", "up", "down"]
T, INTERVAL = 40, 3  # t = int(step - 6) runs 0 .. t_max = int(0.35 T) = 14; shrinking at step 21


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(torch.tanh(self.q(x)))))  # (N, 8)


def _base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _model(base: nn.Module | None = None, **cfg) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base if base is not None else _base()))
    fields = dict(target_modules=TARGETS, r=4, lora_dropout=0.0, total_step=T, dr_prune_interval=INTERVAL) | cfg
    model.add_adapter("default", DrDoraConfig(**fields))
    return model


def _adapters(model: AdapterModel) -> dict[str, DrDoraAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _train(model: AdapterModel, steps: int, check=None, start: int = 1) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    for step in range(start, start + steps):
        loss = (model(torch.randn(16, 16, generator=g)) - 1).square().mean()
        (loss + sum(model.extra_losses().values())).backward()
        opt.step()
        before = {p: a.lora_c_mask.clone() for p, a in _adapters(model).items()}
        changed = model.step_hook(step, opt)
        opt.zero_grad()
        if check is not None:
            check(step, before, changed, opt)
    return opt


def _expected_active(step: int, n0: int = 18, n_target: int = 12) -> int:
    t, t_max = step - 6, 14
    events = [e for e in range(0, min(t, t_max) + 1) if e % INTERVAL == 0 or e == t_max]
    return n0 - (int((n0 - n_target) * (events[-1] / t_max) ** 3) if events else 0)


def test_identity_at_init_with_both_factors_random():
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    assert torch.equal(logits(model, x), logits(base, x))
    for ad in _adapters(model).values():
        assert ad.lora_c.shape == (6,) and ad.r0 == math.ceil(1.5 * 4) and ad.scaling == 8 / 6
        assert torch.equal(ad.lora_c, torch.zeros(6))
        for f, fan_in in ((ad.lora_A, ad.lora_A.shape[1]), (ad.lora_B, 6)):
            assert f.abs().min() > 0 and f.abs().max() <= math.sqrt(6 / fan_in)  # kaiming-uniform, a = 0


def test_gated_forward_merge_lowered_and_importance_twins():
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=3, scale=0.5)
    ad = _adapters(model)["up"]
    ad.lora_c_mask[1] = 0
    g = ad.lora_c * ad.lora_c_mask
    dw = ad.scaling * ad.lora_B @ torch.diag(g) @ ad.lora_A  # (out, in)
    assert close(model.model.up(x), x @ (base.up.weight + dw).T + base.up.bias)
    assert close(ad.delta_weight(), dw)
    low = ad.lowered()
    assert close(low.scale * low.b @ low.a, dw)
    parts = torch.stack([(g[i] * torch.outer(ad.lora_B[:, i], ad.lora_A[i])).norm() for i in range(6)])
    assert torch.allclose(ad.contribution(), parts / ((ad.lora_B @ torch.diag(g) @ ad.lora_A).norm() + 1e-8),
                          atol=1e-6)
    y = logits(model, x)
    model.merge()
    assert close(logits(model, x), y)


def test_regularizer_matches_twin_and_turns_off():
    model = _model(dr_reg_weight=0.3)
    ads = _adapters(model)
    twin = sum(a.lora_A.var(dim=1).sum() + a.lora_B.var(dim=0).sum() for a in ads.values()) / (2 * 6 * 3)
    assert torch.allclose(model.extra_losses()["dr_dora_equilibrium"], 0.3 * twin)
    _train(model, 21)
    assert model.extra_losses() == {}
    assert _model(dr_reg_weight=0.0).extra_losses() == {}


def test_schedule_global_threshold_pruned_stay_zero_and_shrinking():
    model = _model()
    ads = _adapters(model)
    seen_events = []

    def check(step, before, changed, opt):
        if step <= 20:
            assert sum(int(a.lora_c_mask.sum()) for a in ads.values()) == _expected_active(step)
            for p, a in ads.items():
                assert torch.equal(a.lora_c[a.lora_c_mask == 0], torch.zeros(int((a.lora_c_mask == 0).sum())))
                assert not (a.lora_c_mask > before[p]).any()  # no revival
            new = [a.dr_score[(before[p] == 1) & (a.lora_c_mask == 0)] for p, a in ads.items()]
            live = [a.dr_score[a.lora_c_mask == 1] for a in ads.values()]
            if sum(n.numel() for n in new):
                seen_events.append(step)
                assert torch.cat(new).max() <= torch.cat(live).min()  # one threshold over all layers
        if step == 21:
            assert changed  # parameters were replaced: the optimizer was re-synced
            held = {id(p) for grp in opt.param_groups for p in grp["params"]}
            assert held == {id(p) for p in model.parameters() if p.requires_grad}
        if step >= 21:
            assert sum(a.lora_c.shape[0] for a in ads.values()) == 12
            assert all(a.lora_A.shape[0] == a.lora_B.shape[1] == a.lora_c.shape[0] for a in ads.values())
            assert all(bool(a.lora_c_mask.all()) for a in ads.values())

    _train(model, 24, check=check)
    assert len(seen_events) >= 3


def test_no_pruning_without_total_step():
    model = _model(total_step=None)
    _train(model, 25)
    assert all(a.lora_c.shape[0] == 6 and bool(a.lora_c_mask.all()) for a in _adapters(model).values())
    assert "dr_dora_equilibrium" in model.extra_losses()


@pytest.mark.parametrize("steps", [15, 22])  # mid-pruning (masks on disk) and after shrinking (smaller shapes)
def test_save_load_reproduces_outputs(tmp_path, steps):
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    _train(model, steps)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {p: a.lora_c.shape[0] for p, a in _adapters(model).items()}
    assert cfg["dr_rank_pattern"] == {p: k for p, k in ranks.items() if k != 6}
    assert bool(cfg["dr_rank_pattern"]) == (steps > 21)
    fresh = AdapterModel(copy.deepcopy(base))
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), want)
    assert {p: a.lora_c.shape[0] for p, a in _adapters(fresh).items()} == ranks
    assert all(a.pruning_done == (steps > 21) for a in _adapters(fresh).values())


def test_with_layer_fields_escapes_paths_and_refuses_other_fields():
    cfg = DrDoraConfig(r=4).with_layer_fields({"model.layers.0.q_proj": {"dr_rank": 3}})
    assert cfg.dr_rank_pattern == {r"model\.layers\.0\.q_proj": 3}
    with pytest.raises(ConfigError) as e:
        DrDoraConfig(r=4).with_layer_fields({"q": {"r": 3}})
    assert e.value.field == "r"


@pytest.mark.parametrize("kw,field", [(dict(total_step=0), "total_step"),
                                      (dict(dr_prune_start=1.0), "dr_prune_start"),
                                      (dict(dr_prune_start=0.6, dr_prune_end=0.5), "dr_prune_end"),
                                      (dict(dr_prune_interval=0), "dr_prune_interval"),
                                      (dict(dr_reg_weight=-1.0), "dr_reg_weight"),
                                      (dict(use_dora=True), "use_dora"), (dict(use_rslora=True), "use_rslora"),
                                      (dict(init_lora_weights="gaussian"), "init_lora_weights"), (dict(r=0), "r")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        DrDoraConfig(**kw)
    assert e.value.field == field


def test_a_layer_pruned_to_rank_zero_saves_loads_and_merges(tmp_path):
    from peftkit.methods.dr_dora import _compact

    base, x = _base(), torch.randn(3, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=2)
    ad = _adapters(model)["q"]
    ad.lora_c_mask.zero_()
    _compact(ad)
    assert ad.lora_A.shape == (0, 16) and ad.delta_weight().shape == (16, 16)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = AdapterModel(copy.deepcopy(base))
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), want)
    fresh.merge()
    assert close(logits(fresh, x), want)

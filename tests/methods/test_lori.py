"""LoRI (spec 1.13): frozen A, masked B, the global magnitude mask (LoRI-D -> LoRI-S), AdamW keeping B = 0
outside the mask, identity at init, merge, lowered form, seeded A and save -> load with A and the mask on disk.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import AdapterModel, ConfigError, load_adapter, save_adapter
from peftkit.methods.lori import LoriAdapter, LoriConfig, sparsify

from ._helpers import close, hosts, logits, perturb

TARGETS = ["q", "v", "up"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(16, 16), "v": nn.Linear(16, 8),
                                                   "up": nn.Linear(16, 24)}) for _ in range(2))
        self.head = nn.Linear(24 + 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for b in self.blocks:
            x = torch.tanh(b["q"](x))  # (N, 16)
            out = out + torch.cat([b["up"](x), b["v"](x)], dim=-1)  # (N, 32)
        return self.head(out)


def _base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _model(base: nn.Module | None = None, **cfg) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base if base is not None else _base()))
    model.add_adapter("default", LoriConfig(target_modules=TARGETS, r=4, lora_alpha=8, **cfg))
    return model


def _adapters(model: AdapterModel) -> dict[str, LoriAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _train(model: AdapterModel, steps: int, start: int = 0, opt=None, hook: bool = False):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    for step in range(start + 1, start + steps + 1):
        x = torch.randn(8, 16, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if hook:
            model.step_hook(step, opt)
    return opt


def test_a_is_frozen_buffer_and_bit_identical_after_training():
    model = _model()
    ads = _adapters(model)
    before = {p: a.lora_A.clone() for p, a in ads.items()}
    assert all(not isinstance(a.lora_A, nn.Parameter) for a in ads.values())
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_B"}
    _train(model, 3)
    assert all(torch.equal(a.lora_A, before[p]) for p, a in ads.items())
    assert all(a.lora_B.abs().sum() > 0 for a in ads.values())


def test_forward_matches_masked_lora_twin_and_lowered():
    ad = _adapters(_model(init_lora_weights=False))["blocks.0.q"]
    with torch.no_grad():
        ad.lora_B_mask.bernoulli_(0.5)
    x = torch.randn(5, 16)
    twin = ad.scaling * (ad.lora_B * ad.lora_B_mask) @ ad.lora_A  # (out, in)
    assert close(ad(x, None), x @ twin.T)
    assert close(ad.delta_weight(), twin)
    low = ad.lowered()
    assert close(low.scale * low.b @ low.a, twin)


def test_identity_at_init_merge_and_unmerge():
    base, x = _base(), torch.randn(4, 16)
    model = _model(base)
    assert torch.equal(logits(model, x), logits(base, x))
    perturb(model.named_parameters(), seed=3)
    sparsify(model, sparsity=0.5)
    perturb(model.named_parameters(), seed=4)  # B dense again, the mask must hide half of it
    y = logits(model, x)
    assert not close(y, logits(base, x))
    model.merge()
    assert close(logits(model, x), y)
    model.unmerge()
    assert torch.allclose(model.model.blocks[0]["q"].base_layer.weight, base.blocks[0]["q"].weight, atol=1e-6)


@pytest.mark.parametrize("rho", [0.9, 0.75, 0.0])
def test_global_mask_keeps_top_fraction_and_resets_b(rho):
    model = _model()
    _train(model, 3)
    ads = _adapters(model)
    a_before = {p: a.lora_A.clone() for p, a in ads.items()}
    scores = {p: a.lora_B.detach().abs().clone() for p, a in ads.items()}
    params = sparsify(model, sparsity=rho)
    masks = {p: a.lora_B_mask for p, a in ads.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round((1 - rho) * total)
    assert set(torch.cat([m.flatten() for m in masks.values()]).tolist()) <= {0.0, 1.0}
    kept_min = min((scores[p][m.bool()].min() for p, m in masks.items() if m.any()), default=None)
    dropped_max = max((scores[p][~m.bool()].max() for p, m in masks.items() if not m.all()), default=None)
    if kept_min is not None and dropped_max is not None:
        assert kept_min >= dropped_max  # one threshold across layers
    if rho == 0.9:
        assert len({round(float(m.mean()), 3) for m in masks.values()}) > 1  # not a per-layer quota
    assert all(torch.equal(a.lora_B, torch.zeros_like(a.lora_B)) for a in ads.values())
    assert all(torch.equal(a.lora_A, a_before[p]) for p, a in ads.items())
    assert {id(p) for p in params} == {id(a.lora_B) for a in ads.values()}


def test_module_scope_keeps_fraction_per_module_name():
    model = _model(lori_mask_scope="module")
    _train(model, 2)
    sparsify(model)
    ads = _adapters(model)
    for name in TARGETS:
        masks = [a.lora_B_mask for p, a in ads.items() if p.endswith("." + name)]
        assert sum(int(m.sum()) for m in masks) == round(0.1 * sum(m.numel() for m in masks))


def test_b_stays_zero_outside_mask_under_adamw_weight_decay():
    model = _model()
    opt = _train(model, 3)
    sparsify(model, optimizer=opt)
    _train(model, 4, opt=opt)
    for a in _adapters(model).values():
        outside = a.lora_B[a.lora_B_mask == 0]
        assert torch.equal(outside, torch.zeros_like(outside))
    assert any(a.lora_B[a.lora_B_mask == 1].abs().sum() > 0 for a in _adapters(model).values())


def test_step_hook_switches_to_sparse_stage():
    model = _model(lori_sparse_after_steps=3, lori_sparsity=0.8)
    opt = _train(model, 3, hook=True)
    ads = _adapters(model)
    assert all(opt.state.get(a.lora_B) is None for a in ads.values())  # moments of the dense stage dropped
    masks = {p: a.lora_B_mask.clone() for p, a in ads.items()}
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert all(torch.equal(a.lora_B, torch.zeros_like(a.lora_B)) for a in ads.values())
    _train(model, 3, start=3, opt=opt, hook=True)
    assert all(torch.equal(a.lora_B_mask, masks[p]) for p, a in ads.items())  # set once
    assert all(torch.equal(a.lora_B[a.lora_B_mask == 0], torch.zeros(int((a.lora_B_mask == 0).sum())))
               for a in ads.values())


def test_seeded_a_is_reproducible_and_distinct_per_layer():
    one = _adapters(_model(lori_seed=11))
    torch.manual_seed(123)
    two = _adapters(_model(lori_seed=11))
    assert all(torch.equal(one[p].lora_A, two[p].lora_A) for p in one)
    assert not torch.equal(one["blocks.0.q"].lora_A, one["blocks.1.q"].lora_A)


def test_save_load_reproduces_with_a_and_mask_on_disk(tmp_path):
    base, x = _base(), torch.randn(3, 16)
    model = _model(base)
    _train(model, 2)
    sparsify(model, sparsity=0.7)
    _train(model, 2)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.blocks.0.q.lora_A.weight" in keys and "base_model.model.blocks.0.q.lora_B_mask" in keys
    torch.manual_seed(999)  # a different A would be drawn if it were not loaded
    fresh = AdapterModel(copy.deepcopy(base))
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), want)


@pytest.mark.parametrize("kw,field", [(dict(lori_sparsity=1.0), "lori_sparsity"),
                                      (dict(lori_mask_scope="layer"), "lori_mask_scope"),
                                      (dict(lori_sparse_after_steps=0), "lori_sparse_after_steps"),
                                      (dict(init_lora_weights="pissa"), "init_lora_weights"),
                                      (dict(use_dora=True), "use_dora"), (dict(r=0), "r")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        LoriConfig(**kw)
    assert e.value.field == field


def test_sparsify_bad_arguments():
    model = _model()
    with pytest.raises(ConfigError) as e:
        sparsify(model, sparsity=1.5)
    assert e.value.field == "lori_sparsity"
    assert LoriConfig().method == "lori" and LoriConfig.peft_type == "LORI"


def test_two_tasks_concatenate_exactly():
    from peftkit.methods.combine import add_weighted_adapter

    x = torch.randn(3, 16)
    model = AdapterModel(_base())
    for name, seed in (("t1", 1), ("t2", 2)):
        model.add_adapter(name, LoriConfig(target_modules=TARGETS, r=4, lora_alpha=8, lori_seed=seed),
                          trainable=True)
    perturb(model.named_parameters(), seed=5)
    sparsify(model, "t1", sparsity=0.5)
    sparsify(model, "t2", sparsity=0.5)
    perturb(model.named_parameters(), seed=6)
    model.set_active("t1", "t2")
    want = logits(model, x)
    add_weighted_adapter(model, ["t1", "t2"], [1.0, 1.0], "merged", combination_type="cat")
    model.set_active("merged")
    assert close(logits(model, x), want)

"""RoseLoRA (spec 1.28): the cubic keep-rate schedule, the EMA importance, per-row (A) / per-column (B) top-k masks
with exact nonzero bounds, nnz_rows(dW) <= sum_i nnz(b_i), identity at init, exact merge, save -> load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, ConfigError, load_adapter, save_adapter
from peftkit.methods.roselora import RoseLoraAdapter, RoseLoraConfig, keep_count, keep_rate

from ._helpers import close, hosts, logits, perturb

TARGETS = ["q", "up", "down"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.up, self.down = nn.Linear(20, 20), nn.Linear(20, 40), nn.Linear(40, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(torch.tanh(self.q(x)))))  # (N, 12)


def _base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _model(base: nn.Module | None = None, **cfg) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base if base is not None else _base()))
    fields = dict(target_modules=TARGETS, r=4, lora_alpha=8, rose_keep_ratio=0.2, rose_full_steps=2,
                  rose_burn_steps=6) | cfg
    model.add_adapter("default", RoseLoraConfig(**fields))
    return model


def _adapters(model: AdapterModel) -> dict[str, RoseLoraAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _train(model: AdapterModel, steps: int, pre_hook: bool = True, check=None) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(7)
    for step in range(1, steps + 1):
        x = torch.randn(16, 20, generator=g)
        (model(x) - 1).square().mean().backward()
        if pre_hook:
            model.pre_step_hook(step)
        opt.step()
        model.step_hook(step, opt)
        opt.zero_grad()
        if check is not None:
            check(step)


def test_keep_rate_schedule_closed_form():
    rho, tf, tb = 0.05, 3, 20
    rates = [keep_rate(t, rho, tf, tb) for t in range(30)]
    assert rates[:tf + 1] == [1.0] * (tf + 1)  # t < t_full, and t = t_full where the cube is 1
    assert rates[tb:] == [rho] * (30 - tb)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert math.isclose(rates[10], rho + (1 - rho) * (1 - 7 / 17) ** 3)
    assert keep_count(0.05, 40) == 2 and keep_count(0.05, 20) == 1 and keep_count(0.01, 20) == 1
    assert keep_count(1.0, 7) == 7


def test_importance_is_ema_of_abs_w_times_grad():
    ad = _adapters(_model(init_lora_weights=False))["q"]
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(ad.lora_A.shape, generator=g), torch.randn(ad.lora_B.shape, generator=g)) for _ in range(2)]
    expect_a = expect_b = None
    for step, (ga, gb) in enumerate(grads, start=1):
        ad.lora_A.grad, ad.lora_B.grad = ga, gb
        sa, sb = (ad.lora_A * ga).abs().detach(), (ad.lora_B * gb).abs().detach()
        expect_a = sa if expect_a is None else 0.8 * expect_a + 0.2 * sa
        expect_b = sb if expect_b is None else 0.8 * expect_b + 0.2 * sb
        ad.before_optimizer_step(step)
    assert torch.allclose(ad.rose_imp_A, expect_a) and torch.allclose(ad.rose_imp_B, expect_b)


def test_masks_keep_the_most_important_entries_per_row_and_column():
    ad = _adapters(_model(init_lora_weights=False))["up"]  # A (4, 20), B (40, 4)
    a0, b0 = ad.lora_A.detach().clone(), ad.lora_B.detach().clone()
    g = torch.Generator().manual_seed(1)
    ad.rose_imp_A.copy_(torch.rand(ad.rose_imp_A.shape, generator=g))
    ad.rose_imp_B.copy_(torch.rand(ad.rose_imp_B.shape, generator=g))
    ad.apply_masks(0.3)
    ka, kb = math.ceil(0.3 * 20), math.ceil(0.3 * 40)
    for i in range(4):  # slow twin: sort each row of I_A / each column of I_B
        top_a = set(ad.rose_imp_A[i].argsort(descending=True)[:ka].tolist())
        assert set(ad.lora_A[i].nonzero().flatten().tolist()) == top_a
        assert torch.equal(ad.lora_A[i, list(top_a)], a0[i, list(top_a)])
        top_b = set(ad.rose_imp_B[:, i].argsort(descending=True)[:kb].tolist())
        assert set(ad.lora_B[:, i].nonzero().flatten().tolist()) == top_b
        assert torch.equal(ad.lora_B[list(top_b), i], b0[list(top_b), i])


@pytest.mark.parametrize("pre_hook", [True, False])
def test_nonzero_bounds_hold_after_every_step(pre_hook):
    model = _model()
    ads = _adapters(model)
    cfg = next(iter(ads.values())).config
    seen = []

    def check(step: int) -> None:
        rate = keep_rate(step - 1, cfg.rose_keep_ratio, cfg.rose_full_steps, cfg.rose_burn_steps)
        if rate == 1:
            return
        for ad in ads.values():
            r, n_in = ad.lora_A.shape
            n_out = ad.lora_B.shape[0]
            assert ((ad.lora_A != 0).sum(1) <= math.ceil(rate * n_in)).all()
            assert ((ad.lora_B != 0).sum(0) <= math.ceil(rate * n_out)).all()
        seen.append(rate)

    _train(model, 9, pre_hook=pre_hook, check=check)
    assert seen[-1] == cfg.rose_keep_ratio and len(seen) >= 4
    for ad in ads.values():  # at the end: exactly ceil(rho n) nonzeros (the kept entries moved off zero)
        assert ((ad.lora_A != 0).sum(1) == math.ceil(0.2 * ad.lora_A.shape[1])).all()
        b_nnz = (ad.lora_B != 0).sum(0)
        assert (b_nnz == math.ceil(0.2 * ad.lora_B.shape[0])).all()
        delta = ad.delta_weight()
        assert int((delta.abs().sum(1) > 0).sum()) <= int(b_nnz.sum())  # nnz_rows(dW) <= sum_i nnz(b_i)
        assert int((delta.abs().sum(0) > 0).sum()) <= int((ad.lora_A != 0).sum())


def test_clamp_option_bounds_the_factors():
    model = _model(rose_clamp=1e-3)
    _train(model, 5)
    assert all(a.lora_A.abs().max() <= 1e-3 and a.lora_B.abs().max() <= 1e-3 for a in _adapters(model).values())


def test_identity_at_init_merge_and_unmerge():
    base, x = _base(), torch.randn(5, 20)
    model = _model(base)
    assert torch.equal(logits(model, x), logits(base, x))
    _train(model, 8)
    y = logits(model, x)
    assert not close(y, logits(base, x))
    ad = _adapters(model)["up"]
    assert close(ad(x, None), x @ (ad.scaling * ad.lora_B @ ad.lora_A).T.detach())  # LoRA forward
    model.merge()
    assert close(logits(model, x), y)
    model.unmerge()
    assert torch.allclose(model.model.up.base_layer.weight, base.up.weight, atol=1e-6)


def test_train_state_carries_the_scored_step():
    """train_state holds the step the importance last scored, None included (a resumed first score then averages
    into I or, before any, sets it); the resume contract only checkpoints after a step."""
    trained, fresh = _model(), _model()
    _train(trained, 2)
    for path, a in _adapters(trained).items():
        b = _adapters(fresh)[path]
        untouched = b.train_state()
        b.load_train_state(a.train_state())
        assert b._scored_at == a._scored_at == 2 and torch.equal(b.rose_imp_A, a.rose_imp_A)
        a.load_train_state(untouched)
        assert a._scored_at is None and not a.rose_imp_A.any()


def test_save_load_reproduces_sparse_factors(tmp_path):
    base, x = _base(), torch.randn(3, 20)
    model = _model(base)
    _train(model, 8)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = AdapterModel(copy.deepcopy(base))
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), want)
    for p, ad in _adapters(fresh).items():
        assert torch.equal(ad.lora_A, _adapters(model)[p].lora_A)


def test_unmasked_lora_when_keep_ratio_is_one():
    model = _model(rose_keep_ratio=1.0)
    perturb(model.named_parameters(), seed=5)
    _train(model, 8)
    assert all(bool((a.lora_A != 0).all()) for a in _adapters(model).values())


@pytest.mark.parametrize("kw,field", [(dict(rose_keep_ratio=0.0), "rose_keep_ratio"),
                                      (dict(rose_keep_ratio=1.5), "rose_keep_ratio"),
                                      (dict(rose_beta=1.0), "rose_beta"),
                                      (dict(rose_full_steps=-1), "rose_full_steps"),
                                      (dict(rose_full_steps=5, rose_burn_steps=5), "rose_burn_steps"),
                                      (dict(rose_clamp=0.0), "rose_clamp"),
                                      (dict(use_dora=True), "use_dora"),
                                      (dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(r=0), "r")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        RoseLoraConfig(**kw)
    assert e.value.field == field

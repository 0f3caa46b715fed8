"""LoRA Dropout (spec 1.3): masked factors in training, the (1-p)^2 deterministic evaluation, merge, and the
test-time ensemble. Checks are against closed forms written out here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig
from peftkit.methods.loradropout import LoraDropoutConfig, ensemble_predict

from ._helpers import mixed, mixed_inputs

D_IN, D_OUT, R, ALPHA = 10, 7, 4, 8.0
S = ALPHA / R


class Net(nn.Module):
    """Linear -> (dropout the ensemble must leave off) -> Linear head producing logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT)
        self.drop = nn.Dropout(0.9)
        self.head = nn.Linear(D_OUT, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.lin(x)))


def build(p: float = 0.3, method_cls=LoraDropoutConfig, seed: int = 0, **kw) -> AdapterModel:
    torch.manual_seed(seed)
    model = AdapterModel(Net().eval())
    extra = {"loradropout_p": p} if method_cls is LoraDropoutConfig else {}
    model.add_adapter("default", method_cls(target_modules=["lin"], r=R, lora_alpha=ALPHA, **extra, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in (adapter(model).lora_A, adapter(model).lora_B):
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def adapter(model: AdapterModel):
    return model.model.lin.adapters["default"]


def x_batch(seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(seed))  # (B, T, in)


def lin_out(model: AdapterModel, x: torch.Tensor) -> torch.Tensor:
    return model.model.lin(x)


def base_out(model: AdapterModel, x: torch.Tensor) -> torch.Tensor:
    lin = model.model.lin.base_layer
    return x @ lin.weight.T + lin.bias


@pytest.mark.parametrize("train", [False, True])
def test_p0_is_exactly_lora(train):
    ld, lora = build(p=0.0), build(method_cls=LoraConfig)
    with torch.no_grad():
        adapter(lora).lora_A.copy_(adapter(ld).lora_A)
        adapter(lora).lora_B.copy_(adapter(ld).lora_B)
    ld.train(train)
    lora.train(train)
    x = x_batch()
    with torch.no_grad():
        torch.manual_seed(4)  # Net's own dropout draws the same mask in both (p=0 draws no adapter mask)
        y = ld(x)
        torch.manual_seed(4)
        assert torch.equal(y, lora(x))


def test_training_forward_uses_one_mask_pair_and_zeroes_rows_and_columns():
    model = build(p=0.4)
    model.train()
    ad, x = adapter(model), x_batch()
    torch.manual_seed(11)
    with torch.no_grad():
        y = lin_out(model, x)
    torch.manual_seed(11)
    m_a, m_b = ad.draw_masks()
    assert set(m_a.unique().tolist()) <= {0.0, 1.0} and 0 < m_a.sum() < D_IN  # a real mask at this seed
    a, b = ad.masked_factors(m_a, m_b)
    delta = S * b @ a  # (out, in): no 1/(1-p) rescale
    torch.testing.assert_close(y, base_out(model, x) + x @ delta.T, rtol=1e-5, atol=1e-5)  # every token, one mask
    assert torch.all(delta[m_b == 0] == 0) and torch.all(delta[:, m_a == 0] == 0)
    assert torch.all(delta[m_b == 1][:, m_a == 1] != 0)


def test_masked_entries_get_no_gradient():
    model = build(p=0.5)
    model.train()
    ad = adapter(model)
    torch.manual_seed(3)
    lin_out(model, x_batch()).square().sum().backward()
    torch.manual_seed(3)
    m_a, m_b = ad.draw_masks()
    assert torch.all(ad.lora_A.grad[:, m_a == 0] == 0) and torch.all(ad.lora_B.grad[m_b == 0] == 0)
    assert ad.lora_A.grad[:, m_a == 1].abs().sum() > 0


def test_monte_carlo_mean_approaches_the_expected_delta():
    """Entry (i, k) of (m_B B)(A m_A) is (BA)_ik times a Bernoulli((1-p)^2): the mean over N draws is within
    5 standard deviations |BA_ik| sqrt(q^2 (1 - q^2) / N) of q^2 (BA)_ik, q = 1 - p."""
    p, n = 0.3, 10_000
    ad = adapter(build(p=p))
    torch.manual_seed(0)
    total = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            a, b = ad.masked_factors(*ad.draw_masks())
            total += (b @ a).double()
        ba = (ad.lora_B @ ad.lora_A).double()
    q2 = (1 - p) ** 2
    sigma = ba.abs() * math.sqrt(q2 * (1 - q2) / n)
    assert torch.all((total / n - q2 * ba).abs() <= 5 * sigma + 1e-9)
    assert (total / n - ba).abs().max() > 0.1 * ba.abs().max()  # without the (1-p)^2 factor it would be off


def test_eval_output_is_the_scaled_lora():
    p = 0.25
    model = build(p=p)
    ad, x = adapter(model), x_batch()
    with torch.no_grad():
        want = base_out(model, x) + (1 - p) ** 2 * S * x @ ad.lora_A.T @ ad.lora_B.T
        torch.testing.assert_close(lin_out(model, x), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(lin_out(model, x), lin_out(model, x))  # deterministic
        model.train()
        assert not torch.equal(lin_out(model, x), lin_out(model, x))  # masks are sampled afresh


def test_merged_equals_unmerged_in_eval():
    p = 0.35
    model = build(p=p)
    ad, x = adapter(model), x_batch()
    torch.testing.assert_close(ad.delta_weight(), (1 - p) ** 2 * S * ad.lora_B.detach() @ ad.lora_A.detach())
    low = ad.lowered()
    assert low.scale == pytest.approx((1 - p) ** 2 * S)
    with torch.no_grad():
        before = model(x)
        model.merge()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        model.unmerge()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_ensemble_returns_probabilities_deterministic_under_a_seed():
    model = build(p=0.4)
    x = x_batch()
    torch.manual_seed(5)
    probs = ensemble_predict(model, lambda: model(x))
    torch.manual_seed(5)
    again = ensemble_predict(model, lambda: model(x))
    assert torch.equal(probs, again)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4))
    with torch.no_grad():
        deterministic = torch.softmax(model(x), dim=-1)
    assert not torch.allclose(probs, deterministic)
    assert adapter(model).sample_masks is False and not model.model.training


def test_ensemble_is_the_mean_of_n_masked_passes():
    model = build(p=0.4)
    x = x_batch()
    torch.manual_seed(8)
    probs = ensemble_predict(model, lambda: model(x), n=3)
    torch.manual_seed(8)
    adapter(model).sample_masks = True
    with torch.no_grad():
        want = sum(torch.softmax(model(x), dim=-1) for _ in range(3)) / 3
    torch.testing.assert_close(probs, want, rtol=0, atol=0)


def test_ensemble_leaves_other_dropout_off_and_restores_on_error():
    model = build(p=0.0)  # no masks: the ensemble must equal the deterministic eval despite Dropout(0.9)
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(ensemble_predict(model, lambda: model(x)), torch.softmax(model(x), dim=-1))

    def boom() -> torch.Tensor:
        assert adapter(model).sample_masks
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ensemble_predict(model, boom)
    assert adapter(model).sample_masks is False
    with pytest.raises(ConfigError, match="n"):
        ensemble_predict(model, lambda: model(x), n=0)
    with pytest.raises(ConfigError, match="no LoRA Dropout adapter"):
        ensemble_predict(build(method_cls=LoraConfig), lambda: model(x))


def test_every_layer_kind_masks_its_factors():
    """Embedding, Linear and Conv2d: the masks zero A's second dim (vocabulary rows / input channels)."""
    model = AdapterModel(mixed())
    model.add_adapter("default", LoraDropoutConfig(target_modules=["emb", "fc1", "fc2", "conv"], r=R,
                                                   loradropout_p=0.5, init_lora_weights=False))
    model.train()
    with torch.no_grad():
        model(*mixed_inputs())
    for path in ("emb", "fc1", "fc2", "conv"):
        ad = model.model.get_submodule(path).adapters["default"]
        torch.manual_seed(1)
        m_a, m_b = ad.draw_masks()
        a, b = ad.masked_factors(m_a, m_b)
        assert torch.all(a.transpose(0, 1)[m_a == 0] == 0) and torch.all(b[m_b == 0] == 0)


def test_save_load_round_trip(tmp_path):
    model = build(p=0.2)
    peftkit.save_adapter(model, tmp_path, "default")
    torch.manual_seed(0)
    loaded = AdapterModel(Net().eval())
    config = peftkit.load_adapter(loaded, tmp_path, "default")
    assert config == model.configs["default"] and config.method == "loradropout"
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_adapter_starts_in_the_base_mode():
    model = build()
    assert not adapter(model).training
    train_base = Net().train()
    wrapped = AdapterModel(copy.deepcopy(train_base))
    wrapped.add_adapter("default", LoraDropoutConfig(target_modules=["lin"]))
    assert wrapped.model.lin.adapters["default"].training


@pytest.mark.parametrize("field, value", [
    ("loradropout_p", 1.0), ("loradropout_p", -0.1), ("loradropout_p", "0.1"), ("loradropout_p", True),
    ("loradropout_ensemble", 0), ("loradropout_ensemble", 2.5), ("use_dora", True), ("lora_bias", True),
    ("init_lora_weights", "pissa"),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        LoraDropoutConfig(**{field: value})

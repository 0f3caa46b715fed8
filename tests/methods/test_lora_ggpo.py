"""LoRA-GGPO (spec 1.38): the optimizer step uses the gradient at a perturbed point that is never persisted,
sigma = 0 is LoRA, the perturbation's size is linear in the gradient / weight row norms, eval is LoRA.

eps_X[i] = sigma * (c_g * G_X[i] + c_w * ||X[i]||) / sqrt(cols) * n,  n ~ N(0, I);  y = W x + s (B+eps_B)(A+eps_A) x
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig
from peftkit.core.registry import config_for_peft_type
from peftkit.methods.lora_ggpo import LoraGgpoAdapter, LoraGgpoConfig

from ._helpers import hosts, perturb, tiny_gpt2


def _linear():
    return nn.Sequential(nn.Linear(16, 12)), ["0"], torch.randn(5, 16)


def _conv1d():
    return tiny_gpt2(), ["h.0.attn.c_attn"], torch.randint(0, 96, (2, 4))


def _embedding():
    return nn.Sequential(nn.Embedding(30, 10)), ["0"], torch.randint(0, 30, (4, 6))


def _conv2d():
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)), ["0"], torch.randn(2, 3, 6, 6)


KINDS = {"linear": _linear, "conv1d": _conv1d, "embedding": _embedding, "conv2d": _conv2d}


def _out(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def build(kind: str, seed: int = 0, **fields):
    """(ggpo model, its adapter, plain-LoRA twin with the same weights, input), both in training mode."""
    torch.manual_seed(seed)
    base, target, x = KINDS[kind]()
    lora = dict(target_modules=target, r=3, lora_alpha=6, init_lora_weights=False)
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", LoraGgpoConfig(**lora, **fields))
    perturb(model.named_parameters(), seed=seed + 1)
    twin = AdapterModel(copy.deepcopy(base))
    twin.add_adapter("default", LoraConfig(**lora))
    twin.load_state_dict(model.state_dict())
    adapter = next(h.adapters["default"] for h in hosts(model).values())
    return model.train(), adapter, twin.train(), x


def _twin_adapter(twin):
    return next(h.adapters["default"] for h in hosts(twin).values())


def _expected_eps(adapter: LoraGgpoAdapter, seed: int, c) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form of (eps_A, eps_B), drawing A's noise then B's from the global generator."""
    torch.manual_seed(seed)
    out = []
    for p, g in ((adapter.lora_A, adapter.ggpo_grad_A), (adapter.lora_B, adapter.ggpo_grad_B)):
        flat = p.detach().reshape(p.shape[0], -1)  # (rows, cols)
        n = torch.randn(flat.shape)
        std = c.ggpo_sigma * (c.ggpo_grad_coef * g + c.ggpo_weight_coef * flat.norm(dim=1)) / math.sqrt(flat.shape[1])
        out.append((std[:, None] * n).view(p.shape))
    return out[0], out[1]


@pytest.mark.parametrize("kind", list(KINDS))
def test_step_uses_gradient_at_the_perturbed_point(kind: str) -> None:
    model, adapter, twin, x = build(kind, ggpo_sigma=0.5)
    _out(model, x).square().mean().backward()  # a first step fills the gradient-norm EMAs
    model.zero_grad()
    assert adapter.ggpo_grad_A.abs().sum() > 0 and adapter.ggpo_grad_B.abs().sum() > 0
    a0, b0 = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
    ema_a, ema_b = adapter.ggpo_grad_A.clone(), adapter.ggpo_grad_B.clone()
    eps_a, eps_b = _expected_eps(adapter, 7, adapter.config)

    torch.manual_seed(7)
    opt = torch.optim.SGD([adapter.lora_A, adapter.lora_B], lr=0.1)
    _out(model, x).square().mean().backward()
    opt.step()

    ta = _twin_adapter(twin)  # plain LoRA sitting at the perturbed point
    with torch.no_grad():
        ta.lora_A.copy_(a0 + eps_a)
        ta.lora_B.copy_(b0 + eps_b)
    _out(twin, x).square().mean().backward()
    torch.testing.assert_close(adapter.lora_A.detach(), a0 - 0.1 * ta.lora_A.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter.lora_B.detach(), b0 - 0.1 * ta.lora_B.grad, atol=1e-6, rtol=1e-5)
    beta = adapter.config.ggpo_beta
    for ema, g in ((ema_a, ta.lora_A.grad), (ema_b, ta.lora_B.grad)):
        new = adapter.ggpo_grad_A if g is ta.lora_A.grad else adapter.ggpo_grad_B
        torch.testing.assert_close(new, beta * ema + (1 - beta) * g.reshape(g.shape[0], -1).norm(dim=1))
    assert (eps_a.abs().max() > 1e-3) and (eps_b.abs().max() > 1e-3), "the perturbation is not trivial"


def test_linear_gradient_closed_form() -> None:
    """The perturbed-point gradient of y = x W^T + b + s (x A'^T) B'^T, written out by hand."""
    model, adapter, _, x = build("linear", ggpo_sigma=0.3, ggpo_grad_coef=0.0)
    eps_a, eps_b = _expected_eps(adapter, 3, adapter.config)
    torch.manual_seed(3)
    _out(model, x).sum().backward()
    base = next(iter(hosts(model).values())).base_layer
    ap, bp = adapter.lora_A.detach() + eps_a, adapter.lora_B.detach() + eps_b
    g = torch.ones(x.shape[0], base.out_features)  # dL/dy for L = sum(y)
    s = adapter.scaling
    torch.testing.assert_close(adapter.lora_B.grad, s * g.T @ (x @ ap.T))  # (out, r)
    torch.testing.assert_close(adapter.lora_A.grad, s * (g @ bp).T @ x)  # (r, in)
    assert not torch.allclose(adapter.lora_A.grad, s * (g @ adapter.lora_B.detach()).T @ x, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_forward_never_changes_the_factors(kind: str) -> None:
    model, adapter, _, x = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _out(model, x).sum().backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigma_zero_is_lora(kind: str) -> None:
    model, adapter, twin, x = build(kind, ggpo_sigma=0.0)
    y, ty = _out(model, x), _out(twin, x)
    assert torch.equal(y, ty)
    y.square().mean().backward()
    ty.square().mean().backward()
    ta = _twin_adapter(twin)
    assert torch.equal(adapter.lora_A.grad, ta.lora_A.grad) and torch.equal(adapter.lora_B.grad, ta.lora_B.grad)


def test_perturbation_is_linear_in_the_norms() -> None:
    _, adapter, _, _ = build("linear", ggpo_sigma=0.2, ggpo_weight_coef=0.0)
    adapter.ggpo_grad_A.fill_(1.0)
    adapter.ggpo_grad_B.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    e1 = adapter.perturbation()
    adapter.ggpo_grad_A.mul_(3)
    adapter.ggpo_grad_B.mul_(3)
    torch.manual_seed(0)
    e3 = adapter.perturbation()
    for a, b in zip(e1, e3, strict=True):
        torch.testing.assert_close(b, 3 * a)
    _, adapter, _, _ = build("linear", ggpo_sigma=0.2, ggpo_grad_coef=0.0)
    torch.manual_seed(0)
    w1 = adapter.perturbation()
    with torch.no_grad():
        adapter.lora_A.mul_(2)
        adapter.lora_B.mul_(2)
    torch.manual_seed(0)
    w2 = adapter.perturbation()
    for a, b in zip(w1, w2, strict=True):
        torch.testing.assert_close(b, 2 * a)


def test_perturbation_rms_matches_the_formula() -> None:
    """Per-row RMS over many draws = sigma (c_g G + c_w ||row||) / sqrt(cols), within sampling error."""
    _, adapter, _, _ = build("linear", ggpo_sigma=0.1, ggpo_grad_coef=0.7, ggpo_weight_coef=0.3)
    adapter.ggpo_grad_A.uniform_(0.5, 2.0)
    adapter.ggpo_grad_B.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    draws = [adapter.perturbation() for _ in range(400)]
    for i, (p, g) in enumerate(((adapter.lora_A, adapter.ggpo_grad_A), (adapter.lora_B, adapter.ggpo_grad_B))):
        eps = torch.stack([d[i] for d in draws])  # (draws, rows, cols)
        rms = eps.square().mean(dim=(0, 2)).sqrt()  # (rows,)
        expected = 0.1 * (0.7 * g + 0.3 * p.detach().norm(dim=1)) / math.sqrt(p.shape[1])
        torch.testing.assert_close(rms, expected, rtol=0.08, atol=0)


def test_eval_mode_has_no_noise_and_train_mode_has() -> None:
    model, _, twin, x = build("linear")
    train_a, train_b = _out(model, x).detach(), _out(model, x).detach()
    assert not torch.allclose(train_a, train_b)
    model.eval()
    twin.eval()
    assert torch.equal(_out(model, x), _out(twin, x))
    assert torch.equal(_out(model, x), _out(model, x))


def test_adapter_added_to_an_eval_model_adds_no_noise() -> None:
    """New adapter modules start in training mode; the base layer's eval mode keeps the forward LoRA's."""
    base = nn.Sequential(nn.Linear(8, 6)).eval()
    model = AdapterModel(base)
    model.add_adapter("default", LoraGgpoConfig(target_modules=["0"], r=2, init_lora_weights=False))
    x = torch.randn(3, 8)
    assert torch.equal(model(x), model(x))


def test_ema_hooks_survive_deepcopy() -> None:
    model, _, _, x = build("linear")
    clone = copy.deepcopy(model)
    ad = next(h.adapters["default"] for h in hosts(clone).values())
    ad.ggpo_grad_A.zero_()
    _out(clone, x).sum().backward()
    assert ad.ggpo_grad_A.abs().sum() > 0


def test_saved_keys_are_peft_lora_keys_and_peft_reads_them_as_lora(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model, _, _, x = build("linear")
    model.eval()
    peftkit.save_adapter(model, tmp_path, "default")
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA_GGPO"
    cfg = {k: v for k, v in cfg.items() if not k.startswith("ggpo_")} | {"peft_type": "LORA"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    base, _, _ = _linear()  # the same base weights as build() made
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(pm(x), _out(model, x), atol=1e-6, rtol=1e-6)


def test_registry_keeps_lora_and_selects_ggpo() -> None:
    assert config_for_peft_type("LORA") is LoraConfig
    assert config_for_peft_type("LORA_GGPO") is LoraGgpoConfig
    assert LoraGgpoConfig().method == "lora_ggpo" and LoraConfig().method == "lora"
    assert peftkit.get_method("lora_ggpo").adapter_cls is LoraGgpoAdapter


BAD = [("use_dora", True), ("ggpo_sigma", -0.1), ("ggpo_grad_coef", float("nan")), ("ggpo_weight_coef", "1"),
       ("ggpo_beta", 1.0), ("ggpo_beta", -0.5)]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_config_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        LoraGgpoConfig(target_modules=["0"], **{field: value})
    assert info.value.field == field


def test_merge_is_lora() -> None:
    model, adapter, _, x = build("linear")
    model.eval()
    y = _out(model, x)
    weight = next(iter(hosts(model).values())).base_layer.weight
    expected = weight.detach() + adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()  # (out, in)
    model.merge()
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(_out(model, x), y, atol=1e-6, rtol=1e-6)

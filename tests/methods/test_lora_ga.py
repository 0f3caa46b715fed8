"""LoRA-GA (spec 1.9): gradient statistics, SVD factors, stable scale, residual base, and interop with real peft."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, Calibration, ConfigError, LoraConfig
from peftkit.core.calibrate import collect
from peftkit.core.layers import ops_for
from peftkit.methods.lora_ga import lora_ga_factors

from ._helpers import close, hosts, logits, perturb, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def net_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(8, 12, generator=g), "y": torch.randn(8, 6, generator=g)} for _ in range(n)]


def mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]).square().mean()


def ga_net(r: int = 2, **kw) -> tuple[AdapterModel, nn.Module]:
    torch.manual_seed(0)
    base = Net()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", LoraConfig(r=r, lora_alpha=4, target_modules=["fc1", "fc2"],
                                            init_lora_weights="lora_ga", **kw),
                      calibration=Calibration(net_batches(), mse))
    return model, base


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def lm_batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": token_ids(seed=10 + i, batch=2)} for i in range(n)]


def grad_of(model: nn.Module, path: str) -> torch.Tensor:
    """Mean gradient of the calibration loss for one weight, by hand (autograd on that weight only)."""
    w = model.get_submodule(path).weight
    w.requires_grad_(True)
    total = sum(torch.autograd.grad(mse(model, b), w)[0] for b in net_batches())
    w.requires_grad_(False)
    return total / len(net_batches())


# ----------------------------------------------------------------------------------------------- statistics


def test_calibrated_gradient_equals_closed_form() -> None:
    """One Linear, loss mean((X W^T + b - Y)^2): dL/dW = 2 (X W^T + b - Y)^T X / (N out), averaged over batches."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    batches = net_batches()
    stats = collect(lin, {"": ops_for(lin)}, {"grad"}, Calibration(batches, lambda m, b: mse(m, b)))
    expected = torch.zeros(6, 12, dtype=torch.float64)
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    for batch in batches:
        x, y = batch["x"].double(), batch["y"].double()
        expected += 2 * (x @ w.T + b - y).T @ x / y.numel()
    expected /= len(batches)
    assert torch.allclose(stats[""]["grad"].double(), expected, atol=1e-6)
    assert lin.weight.grad is None and lin.weight.requires_grad  # collect restores the model's state


# ------------------------------------------------------------------------------------------------ the init


def test_output_equals_base_and_base_gave_up_s_ba() -> None:
    model, base = ga_net()
    x = net_batches()[0]["x"]
    assert close(model(x), base(x))
    for path, host in hosts(model).items():
        ad = host.adapters["default"]
        w0 = base.get_submodule(path).weight.detach()
        moved = w0 - host.base_layer.weight.detach()
        assert moved.abs().max() > 1e-3  # the base really changed
        assert torch.allclose(moved, ad.scaling * ad.lora_B.detach() @ ad.lora_A.detach(), atol=1e-6)


def test_stable_scale_gives_orthogonal_factors() -> None:
    model, _ = ga_net(r=2)
    for host in hosts(model).values():
        ad = host.adapters["default"]
        a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
        zeta2 = math.sqrt(b.shape[0]) / 16  # (out^(1/4) / sqrt(16))^2
        eye = torch.eye(2, dtype=torch.float64)
        assert torch.allclose(a @ a.T, zeta2 * eye, atol=1e-5)
        assert torch.allclose(b.T @ b, zeta2 * eye, atol=1e-5)


@pytest.mark.parametrize("direction,a_idx,b_idx", [("ArB2r", [0, 1], [2, 3]), ("A2rBr", [2, 3], [0, 1]),
                                                   ("ArBr", [1, 3], [0, 2])])
def test_directions_pick_the_right_singular_vectors(direction, a_idx, b_idx) -> None:
    """4r >= min(out, in) for fc2 (6 x 20, r=2), so the randomized SVD is exact: compare with a full SVD of G."""
    model, base = ga_net(r=2, lora_ga_config={"direction": direction, "scale": "unit"})
    ad = hosts(model)["fc2"].adapters["default"]
    u, _, vh = torch.linalg.svd(grad_of(base, "fc2").double(), full_matrices=False)
    a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
    proj = lambda m: m @ m.T  # noqa: E731  (projector onto the span of orthonormal columns)
    assert torch.allclose(proj(a.T), proj(vh[a_idx].T), atol=1e-5)
    assert torch.allclose(proj(b), proj(u[:, b_idx]), atol=1e-5)
    if direction == "ArB2r":
        assert b.T @ u[:, :2] == pytest.approx(torch.zeros(2, 2, dtype=torch.float64), abs=1e-5)


def test_scales_closed_form() -> None:
    g = torch.randn(10, 7, generator=torch.Generator().manual_seed(3))
    a_unit, b_unit = lora_ga_factors(g, 2, 0.5, {"scale": "unit"})
    a_st, b_st = lora_ga_factors(g, 2, 0.5, {"scale": "stable", "stable_gamma": 4})
    a_gd, b_gd = lora_ga_factors(g, 2, 0.5, {"scale": "gd_scale"})
    zeta = 10 ** 0.25 / 2
    assert torch.allclose(a_st, zeta * a_unit) and torch.allclose(b_st, zeta * b_unit)
    assert torch.allclose(a_gd, a_unit / 0.5) and torch.allclose(b_gd, b_unit / 0.5)
    a_rand, b_rand = lora_ga_factors(g, 2, 0.5, {"direction": "random", "scale": "unit"})
    assert a_rand.shape == (2, 7) and b_rand.shape == (10, 2)
    assert torch.allclose(a_rand @ a_rand.T, torch.eye(2), atol=1e-5)
    assert torch.allclose(b_rand.T @ b_rand, torch.eye(2), atol=1e-5)


def test_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(42)
    first, _ = ga_net()
    after_first = torch.rand(1)
    second, _ = ga_net()
    for (p, h1), h2 in zip(hosts(first).items(), hosts(second).values(), strict=True):
        assert torch.equal(h1.adapters["default"].lora_A, h2.adapters["default"].lora_A), p
    torch.manual_seed(42)
    ga_net()
    assert torch.equal(torch.rand(1), after_first)


def test_trains_like_lora_and_merges_exactly() -> None:
    model, _ = ga_net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mse(model, net_batches()[0]).backward()
    opt.step()
    x = net_batches()[1]["x"]
    trained = model(x).detach()
    model.merge()
    assert close(model(x), trained)


# ----------------------------------------------------------------------------------------------- errors


def test_missing_calibration_is_a_config_error() -> None:
    model = AdapterModel(Net())
    with pytest.raises(ConfigError) as info:
        model.add_adapter("default", LoraConfig(target_modules=["fc1"], init_lora_weights="lora_ga"))
    assert info.value.field == "calibration"
    assert not hosts(model)


@pytest.mark.parametrize("kw,field", [
    ({"lora_ga_config": {"direction": "up"}}, "lora_ga_config"),
    ({"lora_ga_config": {"gamma": 3}}, "lora_ga_config"),
    ({"lora_ga_config": {"stable_gamma": 0}}, "lora_ga_config"),
    ({"lora_ga_config": "ArB2r"}, "lora_ga_config"),
    ({"use_dora": True}, "init_lora_weights"),
])
def test_bad_config_names_the_field(kw, field) -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig(init_lora_weights="lora_ga", **kw)
    assert info.value.field == field


def test_rank_too_large_for_2r_directions() -> None:
    with pytest.raises(ConfigError) as info:
        ga_net(r=4)  # fc2 has min(out, in) = 6 < 2r
    assert info.value.field == "r"


def test_weight_svd_scale_loads_but_is_not_computed() -> None:
    with pytest.raises(ConfigError, match="weight_svd"):
        ga_net(lora_ga_config={"scale": "weight_svd"})


def test_original_base_export_of_a_loaded_adapter_is_refused(tmp_path) -> None:
    model, base = ga_net()
    peftkit.save_adapter(model, tmp_path / "a")
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path / "a")
    with pytest.raises(ConfigError, match="original base"):
        peftkit.save_adapter(loaded, tmp_path / "b", original_base=True)


# ------------------------------------------------------------------------------------------- peft oracle


def residual_copy(pristine: nn.Module, model: nn.Module, prefix: str = "") -> nn.Module:
    """`pristine` with every adapted layer's weight replaced by the (residual) base weight of `model`."""
    out = copy.deepcopy(pristine)
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and name.startswith(prefix):
            path = name.removeprefix(prefix)
            out.get_submodule(path).weight.data.copy_(module.base_layer.weight.data)
    return out


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # peft's gradient-counting hook
def test_peft_lora_ga_adapter_loads_on_its_residual_base(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.loraga import preprocess_loraga

    pristine = tiny_llama()
    batches = lm_batches()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                          lora_ga_config=peft.LoraGAConfig())
    work = copy.deepcopy(pristine)
    preprocess_loraga(work, cfg, lambda: [lm_loss(work, b).backward() for b in batches])
    peft_grads = {n: m._peft_loraga_grad.clone() for n, m in work.named_modules() if hasattr(m, "_peft_loraga_grad")}
    pm = peft.get_peft_model(work, cfg)
    x = token_ids()
    theirs = logits(pm, x)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "lora_ga"

    ours = AdapterModel(residual_copy(pristine, pm, "base_model.model."))
    peftkit.load_adapter(ours, tmp_path)
    assert ours.configs["default"].method == "lora_ga"
    assert close(logits(ours, x), theirs)
    # the same gradient statistic: peftkit's calibration equals peft's estimate
    fresh = copy.deepcopy(pristine)
    stats = collect(fresh, {n: ops_for(fresh.get_submodule(n)) for n in peft_grads}, {"grad"},
                    Calibration(batches, lm_loss))
    assert len(peft_grads) == 8
    assert all(torch.allclose(stats[n]["grad"], g, atol=1e-6) for n, g in peft_grads.items())


def peftkit_lora_ga(pristine: nn.Module) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(pristine))
    model.add_adapter("default", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga"),
                      calibration=Calibration(lm_batches(), lm_loss))
    assert perturb(model.named_parameters(), scale=0.05) > 0
    return model


def test_peftkit_lora_ga_adapter_loads_in_peft_on_the_residual_base(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    pristine = tiny_llama()
    model = peftkit_lora_ga(pristine)
    x = token_ids()
    trained = logits(model, x)
    peftkit.save_adapter(model, tmp_path)
    residual = residual_copy(pristine, model.model)
    theirs = peft.PeftModel.from_pretrained(residual, tmp_path)
    assert close(logits(theirs, x), trained)


def test_original_base_export_is_a_plain_rank_2r_lora(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    pristine = tiny_llama()
    model = peftkit_lora_ga(pristine)
    x = token_ids()
    trained = logits(model, x)
    assert not close(trained, logits(pristine, x), 1e-3)
    peftkit.save_adapter(model, tmp_path, original_base=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True and cfg["lora_ga_config"] is None
    assert all(v.shape[0] == 8 for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
               if k.endswith("lora_A.weight"))
    assert close(logits(peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path), x), trained)
    ours = AdapterModel(copy.deepcopy(pristine))
    peftkit.load_adapter(ours, tmp_path)
    assert ours.configs["default"].method == "lora"
    assert close(logits(ours, x), trained)

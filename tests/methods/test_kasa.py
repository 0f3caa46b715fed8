"""KaSA (spec 1.17): truncated base, SVD-form update B diag(d) A, regularizer, and interop with real peft."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig, UnsupportedLayerError
from peftkit.methods.kasa import dropped_component

from ._helpers import close, hosts, logits, perturb, tiny_gpt2, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def kasa_net(r: int = 3, **kasa) -> tuple[AdapterModel, nn.Module]:
    torch.manual_seed(0)
    base = Net()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", LoraConfig(r=r, lora_alpha=6, target_modules=["fc1", "fc2"], kasa_config=kasa))
    return model, base


def x_in() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(4))


def truncated(w: torch.Tensor, r: int) -> torch.Tensor:
    """Slow twin: rebuild W from its top k - r singular triplets, in fp64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    keep = s.numel() - r
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


# ----------------------------------------------------------------------------------------------- the init


def test_config_selects_kasa() -> None:
    assert LoraConfig(r=2, kasa_config={}).method == "kasa"
    assert LoraConfig(r=2).method == "lora"
    assert peftkit.get_method("kasa").make_config(target_modules=["fc1"]).kasa_config == {}


def test_base_is_truncated_to_rank_k_minus_r() -> None:
    model, base = kasa_net(r=3)
    for path, host in hosts(model).items():
        w0 = base.get_submodule(path).weight.detach()
        wt = host.base_layer.weight.detach()
        k = min(w0.shape)
        s = torch.linalg.svdvals(wt.double())
        assert torch.linalg.matrix_rank(wt.double(), rtol=1e-5).item() == k - 3
        assert torch.allclose(s[:k - 3], torch.linalg.svdvals(w0.double())[:k - 3], rtol=1e-5)
        assert torch.allclose(wt.double(), truncated(w0, 3), atol=1e-5)


def test_output_at_init_is_the_truncated_base_not_the_original() -> None:
    model, base = kasa_net(r=3)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            lin = expected.get_submodule(name)
            lin.weight.copy_(truncated(lin.weight, 3).float())
    x = x_in()
    assert close(model(x), expected(x))
    assert not close(model(x), base(x), rel=1e-3)


def test_forward_and_delta_closed_form() -> None:
    model, base = kasa_net(r=3)
    perturb(model.named_parameters(), seed=7, scale=0.3)
    ad = hosts(model)["fc1"].adapters["default"]
    a, b, d, s = ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_diag.detach(), ad.scaling
    assert s == 2.0 and d.shape == (3,)
    delta = s * b @ torch.diag(d) @ a  # (out, in)
    assert torch.allclose(ad.delta_weight(), delta, atol=1e-6)
    x = x_in()
    w_t = truncated(base.fc1.weight.detach(), 3).float()
    want = x @ (w_t + delta).T + base.fc1.bias.detach()
    host = hosts(model)["fc1"]
    assert close(host(x), want)


def test_merge_equals_unmerged_and_delete_restores_the_original() -> None:
    model, base = kasa_net(r=3)
    perturb(model.named_parameters(), seed=8, scale=0.3)
    x = x_in()
    out = model(x)
    model.merge()
    assert close(model(x), out)
    model.unmerge()
    model.delete_adapter("default")
    for name in ("fc1", "fc2"):
        assert torch.allclose(model.model.get_submodule(name).weight, base.get_submodule(name).weight, atol=1e-6)


def test_the_first_r_singular_values_of_the_dropped_part() -> None:
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    d = dropped_component(w, 2)
    assert torch.allclose(torch.linalg.svdvals(d)[:2], torch.linalg.svdvals(w)[-2:], atol=1e-5)
    assert torch.linalg.matrix_rank(d, rtol=1e-5).item() == 2


# ------------------------------------------------------------------------------------------- regularizer


def reg_twin(ad, beta: float, gamma: float) -> torch.Tensor:
    a, b, d = ad.lora_A.double(), ad.lora_B.double(), ad.lora_diag.double()
    eye = torch.eye(d.numel(), dtype=torch.float64)
    ortho = ((b.T @ b - eye) ** 2).sum().sqrt() + ((a @ a.T - eye) ** 2).sum().sqrt()
    return beta * (d ** 2).sum() + gamma * ortho


def test_regularizer_is_the_mean_over_layers_of_the_closed_form() -> None:
    model, _ = kasa_net(r=3, beta=0.5, gamma=0.25)
    perturb(model.named_parameters(), seed=9, scale=0.3)
    got = model.extra_losses()["kasa"]
    ads = [h.adapters["default"] for h in hosts(model).values()]
    want = sum(reg_twin(ad, 0.5, 0.25) for ad in ads) / len(ads)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    got.backward()
    assert all(ad.lora_diag.grad is not None and ad.lora_A.grad is not None for ad in ads)


def test_regularizer_is_zero_for_orthonormal_factors_and_zero_diag() -> None:
    model, _ = kasa_net(r=3)
    for ad in (h.adapters["default"] for h in hosts(model).values()):
        q_in, _ = torch.linalg.qr(torch.randn(ad.lora_A.shape[1], 3))  # (in, 3) orthonormal columns
        q_out, _ = torch.linalg.qr(torch.randn(ad.lora_B.shape[0], 3))  # (out, 3)
        with torch.no_grad():
            ad.lora_A.copy_(q_in.T)
            ad.lora_B.copy_(q_out)
            ad.lora_diag.zero_()
    assert model.extra_losses()["kasa"].item() == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,field", [
    ({"kasa_config": "yes"}, "kasa_config"), ({"kasa_config": {"beta": -1.0}}, "kasa_config"),
    ({"kasa_config": {"alpha": 1.0}}, "kasa_config"), ({"kasa_config": {"gamma": float("nan")}}, "kasa_config"),
    ({"kasa_config": {}, "use_dora": True}, "use_dora"),
    ({"kasa_config": {}, "init_lora_weights": "pissa"}, "init_lora_weights"),
])
def test_bad_config_names_the_field(kw, field) -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=2, **kw)
    assert info.value.field == field


def test_rank_must_leave_part_of_the_spectrum() -> None:
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as info:
        AdapterModel(Net()).add_adapter("a", LoraConfig(r=6, target_modules=["fc2"], kasa_config={}))
    assert info.value.field == "r" and "min(out, in) = 6" in str(info.value)


def test_embedding_is_unsupported() -> None:
    with pytest.raises(UnsupportedLayerError):
        AdapterModel(nn.Sequential(nn.Embedding(10, 8))).add_adapter(
            "a", LoraConfig(r=2, target_modules=["0"], kasa_config={}))


def test_conv1d_layers_work_like_linear() -> None:
    """peft refuses Conv1D for KaSA; peftkit handles it through the layer view: the delta is the same math."""
    base = tiny_gpt2()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", LoraConfig(r=2, target_modules=["c_attn"], kasa_config={}))
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().T  # (out, in)
    host = hosts(model)["transformer.h.0.attn.c_attn"]
    assert torch.allclose(host.base_layer.weight.detach().T.double(), truncated(w0, 2), atol=1e-5)


# ------------------------------------------------------------------------------------------- peft oracle


def peft_kasa(base: nn.Module, **kw):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=peft.KasaConfig(**kw))
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def test_peft_adapter_loads_onto_the_original_base(tmp_path) -> None:
    base = tiny_llama()
    pm = peft_kasa(base, beta=0.01, gamma=0.02)
    assert perturb(pm.named_parameters(), seed=3) == 3 * len(TARGETS) * 2
    x = token_ids()
    theirs = logits(pm, x)
    pm.save_pretrained(tmp_path)
    ours = AdapterModel(copy.deepcopy(base))
    config = peftkit.load_adapter(ours, tmp_path, trainable=True)
    assert config.method == "kasa" and config.kasa_config == {"beta": 0.01, "gamma": 0.02}
    assert close(logits(ours, x), theirs)
    assert torch.allclose(ours.extra_losses()["kasa"] * len(hosts(ours)), pm._get_kasa_loss(), rtol=1e-5)


def test_peftkit_adapter_loads_in_peft_onto_the_original_base(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ours = AdapterModel(copy.deepcopy(base))
    ours.add_adapter("default", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config={"beta": 0.1}))
    perturb(ours.named_parameters(), seed=5)
    x = token_ids()
    mine = logits(ours, x)
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert theirs.peft_config["default"].kasa_config.beta == 0.1
    assert close(logits(theirs, x), mine)

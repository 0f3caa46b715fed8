"""GraLoRA (spec 1.14): block math against an explicit block-by-block twin, k=1 == LoRA, block ranks, merge,
config errors, and interop with real peft (both directions, keys and shapes, parameter counts, hybrid_r > 0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig
from peftkit.methods.gralora import GraloraAdapter, GraloraConfig

from ._helpers import close, hosts, logits, perturb, tiny_gpt2, tiny_llama, token_ids


def _model(n_in: int = 32, n_out: int = 24, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out), nn.Tanh(), nn.Linear(n_out, 8))


def _adapted(seed: int = 3, **cfg) -> tuple[AdapterModel, GraloraAdapter]:
    model = AdapterModel(_model())
    model.add_adapter("a", GraloraConfig(target_modules=["0"], **cfg))
    perturb(model.named_parameters(), seed=seed, scale=0.3)
    return model, hosts(model)["0"].adapters["a"]


def _block_twin(ad: GraloraAdapter) -> torch.Tensor:
    """dW built block by block from the paper's formula: block (j, n) = B_j[chunk n]^T A_n[:, chunk j]^T."""
    k, rk = ad.k, ad.r // ad.k
    a, b = ad.gralora_A.detach(), ad.gralora_B.detach()  # (k, in/k, r), (k, r, out/k)
    rows = []
    for j in range(k):
        rows.append(torch.cat([b[j, n * rk:(n + 1) * rk].T @ a[n][:, j * rk:(j + 1) * rk].T for n in range(k)], 1))
    d = torch.cat(rows, 0)  # (out, in)
    if ad.gralora_A_general is not None:
        d = d + ad.gralora_B_general.detach() @ ad.gralora_A_general.detach()
    return ad.scaling * d


@pytest.mark.parametrize("k,hybrid_r", [(1, 0), (2, 0), (4, 0), (2, 3)])
def test_forward_and_delta_match_block_twin(k, hybrid_r):
    _, ad = _adapted(r=8, alpha=12, gralora_k=k, hybrid_r=hybrid_r)
    x = torch.randn(2, 5, 32)
    d = _block_twin(ad)
    assert close(ad.delta_weight(), d)
    assert close(ad(x, None), x @ d.T)
    low = ad.lowered()
    assert low.a.shape[0] == k * 8 + hybrid_r
    assert close(low.scale * low.b @ low.a, d)


def test_scaling_is_alpha_over_r_plus_hybrid_r():
    assert GraloraConfig(r=8, alpha=12, hybrid_r=4).scaling == 1.0
    assert GraloraConfig(r=8, alpha=12).scaling == 1.5


def test_k1_equals_lora():
    torch.manual_seed(0)
    base = _model()
    x = torch.randn(4, 32)
    g = AdapterModel(copy.deepcopy(base))
    g.add_adapter("a", GraloraConfig(target_modules=["0"], r=6, alpha=9, gralora_k=1))
    lo = AdapterModel(copy.deepcopy(base))
    lo.add_adapter("a", LoraConfig(target_modules=["0"], r=6, lora_alpha=9))
    ga, la = hosts(g)["0"].adapters["a"], hosts(lo)["0"].adapters["a"]
    with torch.no_grad():
        ga.gralora_A.copy_(torch.randn(1, 32, 6))
        ga.gralora_B.copy_(torch.randn(1, 6, 24))
        la.lora_A.copy_(ga.gralora_A[0].T)
        la.lora_B.copy_(ga.gralora_B[0].T)
    assert ga.scaling == la.scaling
    assert close(logits(g, x), logits(lo, x))
    assert close(ga.delta_weight(), la.delta_weight())


def test_block_ranks_and_full_rank():
    torch.manual_seed(1)
    _, ad = _adapted(r=8, gralora_k=4)  # 32 -> 24: blocks (6, 8), rank <= 2 each
    d = ad.delta_weight()
    for j in range(4):
        for n in range(4):
            assert torch.linalg.matrix_rank(d[j * 6:(j + 1) * 6, n * 8:(n + 1) * 8]).item() <= 2
    assert torch.linalg.matrix_rank(d).item() == min(4 * 8, 24)  # k r = 32 > LoRA's r = 8
    m = AdapterModel(_model(64, 64))
    m.add_adapter("a", GraloraConfig(target_modules=["0"], r=8, gralora_k=4))
    perturb(m.named_parameters(), seed=2)
    assert torch.linalg.matrix_rank(hosts(m)["0"].adapters["a"].delta_weight()).item() == 32


def test_identity_at_init_and_merge():
    base = _model()
    x = torch.randn(3, 32)
    want = logits(base, x)
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("a", GraloraConfig(target_modules=["0", "2"], r=4, gralora_k=2, hybrid_r=2))
    assert torch.equal(logits(model, x), want)
    perturb(model.named_parameters(), seed=5)
    y = logits(model, x)
    assert not close(y, want)
    model.merge()
    assert close(logits(model, x), y)
    model.unmerge()
    assert close(logits(model, x), y)
    assert torch.allclose(model.model[0].base_layer.weight, base[0].weight, atol=1e-6)


@pytest.mark.parametrize("kw,field", [(dict(r=6, gralora_k=4), "gralora_k"), (dict(r=0), "r"),
                                      (dict(hybrid_r=-1), "hybrid_r"), (dict(alpha=0), "alpha"),
                                      (dict(gralora_dropout=1.0), "gralora_dropout"), (dict(gralora_k=0), "gralora_k")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        GraloraConfig(**kw)
    assert e.value.field == field


def test_layer_not_divisible_names_gralora_k():
    model = AdapterModel(_model(30, 24))
    with pytest.raises(ConfigError, match="in_features=30") as e:
        model.add_adapter("a", GraloraConfig(target_modules=["0"], r=4, gralora_k=4))
    assert e.value.field == "gralora_k"


# --- peft interop ------------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]
CASES = {
    "llama": (tiny_llama, dict(r=4, alpha=8, gralora_k=2, target_modules=LLAMA)),
    "llama-hybrid": (tiny_llama, dict(r=8, alpha=6, gralora_k=4, hybrid_r=2, target_modules=LLAMA)),
    "gpt2": (tiny_gpt2, dict(r=4, alpha=8, gralora_k=2, hybrid_r=1, fan_in_fan_out=True,
                             target_modules=["c_attn", "c_fc"])),
}


def _pair(case: str, init_weights: bool):
    build, kw = CASES[case]
    base = build()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.GraloraConfig(init_weights=init_weights, **kw))
    km = peftkit.get_peft_model(copy.deepcopy(base), GraloraConfig(init_weights=init_weights, **kw))
    return base, pm, km


@pytest.mark.parametrize("case", list(CASES))
def test_peft_writes_peftkit_reads(case, tmp_path):
    base, pm, _ = _pair(case, init_weights=False)
    x = token_ids()
    want = logits(pm, x)
    assert not close(want, logits(base, x))
    pm.save_pretrained(tmp_path)
    got = logits(peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_writes_peft_reads(case, tmp_path):
    base, _, km = _pair(case, init_weights=False)
    x = token_ids()
    want = logits(km, x)
    assert not close(want, logits(base, x))
    km.save_pretrained(tmp_path)
    got = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_same_keys_shapes_and_counts(case, tmp_path):
    _, pm, km = _pair(case, init_weights=True)
    pm.save_pretrained(tmp_path / "peft")
    km.save_pretrained(tmp_path / "peftkit")
    theirs = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    ours = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peftkit" / "adapter_model.safetensors").items()}
    assert ours == theirs
    assert km.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_merged_delta_matches_peft():
    _, pm, km = _pair("llama-hybrid", init_weights=False)
    path = "model.layers.0.mlp.up_proj"
    theirs = pm.base_model.model.get_submodule(path).get_delta_weight("default")
    ours_ad = hosts(km)[path].adapters["default"]
    src = pm.base_model.model.get_submodule(path)
    with torch.no_grad():
        ours_ad.gralora_A.copy_(src.gralora_A["default"])
        ours_ad.gralora_B.copy_(src.gralora_B["default"])
        ours_ad.gralora_A_general.copy_(src.gralora_A_general["default"].weight)
        ours_ad.gralora_B_general.copy_(src.gralora_B_general["default"].weight)
    assert close(ours_ad.delta_weight(), theirs)

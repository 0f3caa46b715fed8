"""VB-LoRA (spec 1.12): top-k admixture against a per-sub-vector slow twin, convex hull, rank, the one shared bank,
clear errors, top-k-only checkpoints, and interop with real peft (keys, shapes, logits, parameter counts).

Sub-vector v = sum_j softmax(topk(z))_j bank[idx_j]; A (r, in) rows and B (out, r) columns concatenate them;
y = W x + b + B A x (no scaling).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, UnsupportedLayerError
from peftkit.methods.vblora import VBLoRAAdapter, VBLoRAConfig

from ._helpers import hosts, logits, perturb, tiny_gpt2, tiny_llama, token_ids

TOL = 1e-5
LLAMA = dict(r=4, num_vectors=16, vector_length=16, target_modules=["q_proj", "v_proj", "down_proj"])
GPT2 = dict(r=2, num_vectors=12, vector_length=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])


def _adapters(model) -> dict[str, VBLoRAAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _mlp(**kw) -> tuple[AdapterModel, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24))
    model = AdapterModel(base)
    model.add_adapter("default", VBLoRAConfig(target_modules=["0", "2"], **{**dict(vector_length=8), **kw}))
    return model, torch.randn(5, 16)


def _slow_subvector(z: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sub-vector by hand: the k largest logits by a full sort, their softmax weights, the mixture."""
    order = sorted(range(z.numel()), key=lambda i: -float(z[i]))[:k]
    w = torch.exp(z[order] - z[order].max())
    w = w / w.sum()
    return torch.tensor(order), w, (w[:, None] * bank[order]).sum(0)


def _slow_factors(ad: VBLoRAAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    k, bank, b = ad.config.topk, ad.vblora_vector_bank.detach(), ad.config.vector_length
    za, zb = ad.vblora_logits_A.detach(), ad.vblora_logits_B.detach()
    a = torch.zeros(za.shape[0], za.shape[1] * b)
    for i in range(za.shape[0]):
        for t in range(za.shape[1]):
            a[i, t * b:(t + 1) * b] = _slow_subvector(za[i, t], bank, k)[2]
    bm = torch.zeros(zb.shape[0] * b, zb.shape[1])
    for t in range(zb.shape[0]):
        for j in range(zb.shape[1]):
            bm[t * b:(t + 1) * b, j] = _slow_subvector(zb[t, j], bank, k)[2]
    return a, bm


# --- math -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_factors_match_the_per_subvector_twin(topk):
    model, _ = _mlp(r=3, num_vectors=10, topk=topk)
    for ad in _adapters(model).values():
        a, b = ad.factors()
        a_ref, b_ref = _slow_factors(ad)
        torch.testing.assert_close(a, a_ref, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(b, b_ref, atol=1e-7, rtol=1e-6)


def test_every_subvector_is_a_convex_mix_of_at_most_k_bank_vectors():
    model, _ = _mlp(r=2, num_vectors=12, topk=2)
    ad = _adapters(model)["2"]
    bank, b = ad.vblora_vector_bank.detach(), 8
    a, _ = ad.factors()
    for i in range(2):
        for t in range(32 // b):
            idx, w, _ = _slow_subvector(ad.vblora_logits_A[i, t].detach(), bank, 2)
            assert len(set(idx.tolist())) <= 2 and (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-6
            sol = torch.linalg.lstsq(bank[idx].T.double(), a[i, t * b:(t + 1) * b].detach().double()[:, None])
            coeffs = sol.solution.squeeze(1)  # the bank rows are independent: the mixture weights are unique
            assert (coeffs > -1e-6).all() and abs(float(coeffs.sum()) - 1) < 1e-6
            torch.testing.assert_close(coeffs.float(), w, atol=1e-5, rtol=1e-4)


def test_forward_is_base_plus_b_a_x_without_scaling():
    model, x = _mlp(r=3, num_vectors=10)
    with model.disabled():
        want_base = model(x)
    a0, b0 = _slow_factors(_adapters(model)["0"])
    first = model.model[0]
    want_first = nn.functional.linear(x, first.base_layer.weight, first.base_layer.bias) + x @ a0.T @ b0.T
    torch.testing.assert_close(first(x), want_first, atol=1e-6, rtol=1e-5)
    assert (model(x) - want_base).abs().max() > 1e-4, "VB-LoRA is not identity at init: the output must move"


def test_rank_of_delta_is_at_most_r():
    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Linear(64, 64)))
    model.add_adapter("default", VBLoRAConfig(target_modules=["0"], r=3, num_vectors=32, vector_length=8))
    sv = torch.linalg.svdvals(_adapters(model)["0"].delta_weight().detach().double())  # (64,)
    assert sv[2] > 1e-3 * sv[0] and sv[3] < 1e-5 * sv[0]  # rank exactly r = 3, up to fp32 rounding


def test_merge_equals_unmerged_and_delta_is_b_at_a():
    model, x = _mlp(r=3, num_vectors=10)
    perturb(model.named_parameters(), scale=0.5)
    want = model(x).detach()
    ad = _adapters(model)["0"]
    a, b = _slow_factors(ad)
    torch.testing.assert_close(ad.delta_weight(), b @ a, atol=1e-6, rtol=1e-5)
    model.merge()
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


# --- the shared bank ------------------------------------------------------------------------------------------
def test_bank_is_one_storage_across_layers_and_counted_once():
    model, x = _mlp(num_vectors=10)
    ads = list(_adapters(model).values())
    assert ads[0].vblora_vector_bank is ads[1].vblora_vector_bank
    assert ads[0].vblora_vector_bank.data_ptr() == ads[1].vblora_vector_bank.data_ptr()
    logit_count = sum(ad.vblora_logits_A.numel() + ad.vblora_logits_B.numel() for ad in ads)
    assert model.param_report().trainable == logit_count + 10 * 8


def test_bank_gradient_is_the_sum_over_layers():
    model, x = _mlp(num_vectors=10)
    model(x).square().sum().backward()
    shared = _adapters(model)["0"].vblora_vector_bank.grad.clone()
    twin, _ = _mlp(num_vectors=10)  # same seed: same values; untie the bank into one copy per layer
    copies = []
    for ad in _adapters(twin).values():
        ad.vblora_vector_bank = nn.Parameter(ad.vblora_vector_bank.detach().clone())
        copies.append(ad.vblora_vector_bank)
    twin(x).square().sum().backward()
    torch.testing.assert_close(shared, sum(c.grad for c in copies), atol=1e-6, rtol=1e-5)
    assert all(c.grad.abs().sum() > 0 for c in copies)


# --- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("r", 0), ("topk", 0), ("topk", 300), ("vector_length", 0),
                                         ("num_vectors", -1), ("vblora_dropout", 1.0), ("init_logits_std", 0.0),
                                         ("init_vector_bank_bound", -0.1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        VBLoRAConfig(target_modules=["0"], **{field: value})
    assert e.value.field == field


def test_peft_bias_spelling_is_accepted():
    assert VBLoRAConfig(target_modules=["0"], bias="vblora_only").bias == "lora_only"


def test_indivisible_width_and_unsupported_layers_raise_clearly():
    model = AdapterModel(nn.Sequential(nn.Linear(12, 16)))
    with pytest.raises(UnsupportedLayerError, match="divisible by vector_length=8"):
        model.add_adapter("default", VBLoRAConfig(target_modules=["0"], vector_length=8))
    model = AdapterModel(nn.Sequential(nn.Embedding(16, 8)))
    with pytest.raises(UnsupportedLayerError, match="nn.Linear and transformers Conv1D only"):
        model.add_adapter("default", VBLoRAConfig(target_modules=["0"], vector_length=8))


# --- peft interop ---------------------------------------------------------------------------------------------
def _peft():
    return pytest.importorskip("peft")


def _case(kind: str):
    return (tiny_llama(), LLAMA) if kind == "llama" else (tiny_gpt2(), GPT2)


def _changed(base, x, out) -> None:
    assert (logits(base, x) - out).abs().max() > 1e-3, "the adapter must change the output"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_writes_peftkit_reads(kind, tmp_path):
    peft, (base, kw), x = _peft(), _case(kind), token_ids()
    src = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kw))
    assert perturb(src.named_parameters()) > 0
    want = logits(src, x)
    _changed(base, x, want)
    src.save_pretrained(tmp_path)
    got = logits(peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x)
    assert (got - want).abs().max() < TOL


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peftkit_writes_peft_reads(kind, tmp_path):
    peft, (base, kw), x = _peft(), _case(kind), token_ids()
    src = peftkit.get_peft_model(copy.deepcopy(base), VBLoRAConfig(**kw))
    assert perturb(src.named_parameters()) > 0
    want = logits(src, x)
    _changed(base, x, want)
    src.save_pretrained(tmp_path)
    got = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x)
    assert (got - want).abs().max() < TOL


@pytest.mark.parametrize("topk_only", [False, True])
def test_same_keys_shapes_dtypes_and_counts(topk_only, tmp_path):
    peft, base = _peft(), tiny_llama()
    kw = {**LLAMA, "save_only_topk_weights": topk_only}
    theirs_model = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kw))
    ours_model = peftkit.get_peft_model(copy.deepcopy(base), VBLoRAConfig(**kw))
    assert ours_model.get_nb_trainable_parameters() == theirs_model.get_nb_trainable_parameters()
    theirs_model.save_pretrained(tmp_path / "peft")
    ours_model.save_pretrained(tmp_path / "peftkit")
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in load_file(tmp_path / "peft/adapter_model.safetensors").items()}
    ours = {k: (tuple(v.shape), v.dtype) for k, v in load_file(tmp_path / "peftkit/adapter_model.safetensors").items()}
    assert ours == theirs
    assert ("base_model.vblora_vector_bank" in ours) and sum("vector_bank" in k for k in ours) == 1


def test_topk_only_checkpoint_written_by_peftkit_loads_in_peft(tmp_path):
    peft, base, x = _peft(), tiny_llama(), token_ids()
    src = peftkit.get_peft_model(copy.deepcopy(base), VBLoRAConfig(**LLAMA, save_only_topk_weights=True))
    perturb(src.named_parameters())
    want = logits(src, x)
    src.save_pretrained(tmp_path)
    got = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x)
    assert (got - want).abs().max() < TOL


def test_topk_only_checkpoint_written_by_peft_loads_and_reproduces_delta(tmp_path):
    """peft's save_only_topk_weights file (integer index tensors) loads: same logits and delta weights."""
    peft, base, x = _peft(), tiny_llama(), token_ids()
    src = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**LLAMA, save_only_topk_weights=True))
    perturb(src.named_parameters())
    want = logits(src, x)
    src.save_pretrained(tmp_path)
    model = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(model, tmp_path)
    assert (logits(model, x) - want).abs().max() < TOL
    ours, theirs = _adapters(model), {p.removeprefix("base_model.model."): m for p, m in src.named_modules()}
    for path, ad in ours.items():
        torch.testing.assert_close(ad.delta_weight(), theirs[path].get_delta_weight("default"), atol=1e-7, rtol=1e-6)
    model.set_trainable("default")
    model.train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        model(x)

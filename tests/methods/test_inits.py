"""Base-mutating factor inits: PiSSA (spec 1.6), OLoRA (1.7), NLoRA (1.8).

Closed forms checked here (fp64 where orthogonality is involved):
  PiSSA: s B A = U_r S_r V_r^T, rows of A orthogonal, W_res = W - s B A.
  OLoRA: B = Q_r (B^T B = I), A = Q_r^T W upper-trapezoidal, so s B A = s * (projection onto span W[:, :r]) W.
  NLoRA: s B A = W[:, I] pinv(W[I, I]) W[I, :], which is W itself when rank(W) = r and W[I, I] is invertible.
Plus the rank-2r export to the original base, loaded by real peft, and a direct comparison with peft's inits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoraConfig

from ._helpers import close, hosts, logits, peft_lora_modules, perturb, rel_err, tiny_gpt2, tiny_llama, token_ids

SVD_INITS = ["pissa", "pissa_niter_4", "olora", "nlora"]
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # square, wide and tall weights


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def weights2d(model: nn.Module, paths) -> dict[str, torch.Tensor]:
    """Original (out, in) weights of plain modules, written out per layer type (Conv1D stores (in, out))."""
    out = {}
    for p in paths:
        m = model.get_submodule(p)
        w = m.weight.detach()
        out[p] = (w.T if type(m).__name__ == "Conv1D" else w).double().clone()
    return out


def adapted(base: nn.Module, init: str, targets, r: int = 4, alpha: float = 8, **kw) -> peftkit.PeftModel:
    return peftkit.get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                  init_lora_weights=init, **kw))


def sba(adapter) -> torch.Tensor:
    """s * B @ A in fp64, by hand from the stored factors."""
    a = adapter.lora_A.detach().double().reshape(adapter.lora_A.shape[0], -1)
    b = adapter.lora_B.detach().double().reshape(adapter.lora_B.shape[0], -1)
    return adapter.scaling * b @ a


def residual2d(host) -> torch.Tensor:
    w = host.base_layer.weight.detach().double()
    return w.T if type(host.base_layer).__name__ == "Conv1D" else w


# ------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_identity_at_init_and_residual_plus_delta_is_w(kind, init, llama, gpt2):
    base = llama if kind == "llama" else gpt2
    targets = LLAMA_TARGETS if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    x = token_ids()
    ref = logits(base, x)
    model = adapted(base, init, targets)
    assert close(logits(model, x), ref, 1e-5)
    originals = weights2d(base, hosts(model))
    assert len(originals) > 4
    for path, host in hosts(model).items():
        ad = host.adapters["default"]
        w_res = residual2d(host)
        assert rel_err(w_res + sba(ad), originals[path]) < 1e-5, path
        assert rel_err(w_res, originals[path]) > 1e-3, path  # the base really was changed


# ------------------------------------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("alpha", [4, 8, 3])
def test_pissa_factors_are_truncated_svd(llama, alpha):
    r = 4
    model = adapted(llama, "pissa", LLAMA_TARGETS, r=r, alpha=alpha)
    originals = weights2d(llama, hosts(model))
    for path, host in hosts(model).items():
        ad = host.adapters["default"]
        u, sv, vh = torch.linalg.svd(originals[path], full_matrices=False)
        best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
        assert rel_err(sba(ad), best) < 1e-4, path
        a = ad.lora_A.detach().double()
        gram = a @ a.T  # (r, r): diag(S_r / s)
        d = gram.diagonal()
        off = gram - torch.diag(d)
        assert (off.abs() / torch.sqrt(d[:, None] * d[None, :])).max() < 1e-5, path
        assert torch.allclose(d, sv[:r] / ad.scaling, rtol=1e-4), path


def test_pissa_niter_is_orthogonal_and_near_optimal():
    """Randomized SVD on a weight with a decaying spectrum: rows of A orthogonal, error close to optimal."""
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(40, 40))
    q2, _ = torch.linalg.qr(torch.randn(30, 30))
    spectrum = 0.3 ** torch.arange(30.0)
    base = nn.Sequential(nn.Linear(30, 40))
    with torch.no_grad():
        base[0].weight.copy_(q1[:, :30] @ torch.diag(spectrum) @ q2.T)
    w = base[0].weight.detach().double().clone()
    r = 5
    model = adapted(base, "pissa_niter_4", ["0"], r=r, alpha=10)
    ad = model.model[0].adapters["default"]
    a = ad.lora_A.detach().double()
    gram = a @ a.T
    d = gram.diagonal()
    assert ((gram - torch.diag(d)).abs() / torch.sqrt(d[:, None] * d[None, :])).max() < 1e-5
    u, sv, vh = torch.linalg.svd(w)
    best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
    assert rel_err(sba(ad), best) < 1e-3
    assert rel_err(residual2d(model.model[0]) + sba(ad), w) < 1e-5


# ------------------------------------------------------------------------------------------- OLoRA


def test_olora_factors(llama):
    r, alpha = 4, 6
    model = adapted(llama, "olora", LLAMA_TARGETS, r=r, alpha=alpha)
    originals = weights2d(llama, hosts(model))
    for path, host in hosts(model).items():
        ad = host.adapters["default"]
        w = originals[path]
        b = ad.lora_B.detach().double()
        a = ad.lora_A.detach()
        assert torch.allclose(b.T @ b, torch.eye(r, dtype=torch.float64), atol=1e-5), path
        assert torch.count_nonzero(torch.tril(a, diagonal=-1)) == 0, path  # upper-trapezoidal
        assert torch.count_nonzero(a.diagonal()) == r, path
        assert rel_err(a.double(), b.T @ w) < 1e-4, path  # A = Q_r^T W
        wr = w[:, :r]
        projector = wr @ torch.linalg.solve(wr.T @ wr, wr.T)  # onto span of the first r columns
        assert rel_err(sba(ad), alpha / r * projector @ w) < 1e-4, path


# ------------------------------------------------------------------------------------------- NLoRA


def test_nlora_exact_on_rank_r_weight():
    torch.manual_seed(0)
    r, alpha = 3, 6
    base = nn.Sequential(nn.Linear(10, 12))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(12, r) @ torch.randn(r, 10))
    w = base[0].weight.detach().double().clone()
    assert torch.linalg.matrix_rank(w, rtol=1e-5).item() == r
    assert torch.linalg.matrix_rank(w[:r, :r], rtol=1e-5).item() == r
    model = adapted(base, "nlora", ["0"], r=r, alpha=alpha)
    host = model.model[0]
    ad = host.adapters["default"]
    assert torch.equal(ad.lora_B.detach().double(), w[:, :r])  # B = W[:, I]
    assert rel_err(sba(ad), w) < 1e-4  # B N A = W
    assert residual2d(host).abs().max() < 1e-4 * w.abs().max()  # nothing left in the base
    x = torch.randn(4, 10)
    assert close(model(x), x @ w.float().T + host.base_layer.bias)


def test_nlora_general_weight_is_nystrom(llama):
    r = 4
    model = adapted(llama, "nlora", LLAMA_TARGETS, r=r, alpha=8)
    originals = weights2d(llama, hosts(model))
    for path, host in hosts(model).items():
        w = originals[path]
        nystrom = w[:, :r] @ torch.linalg.inv(w[:r, :r]) @ w[:r, :]
        assert rel_err(sba(host.adapters["default"]), nystrom) < 1e-3, path


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("init", SVD_INITS)
def test_rank_above_min_dim_raises_config_error_naming_r(init):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    w0 = base[0].weight.detach().clone()
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.get_peft_model(base, LoraConfig(r=7, target_modules=["0"], init_lora_weights=init))
    assert info.value.field == "r"
    assert isinstance(base[0], nn.Linear) and torch.equal(base[0].weight, w0)  # nothing changed


def test_rank_pattern_above_min_dim_raises(llama):
    with pytest.raises(peftkit.ConfigError) as info:
        adapted(llama, "pissa", ["v_proj", "q_proj"], r=4, rank_pattern={"v_proj": 33})  # v_proj is (32, 64)
    assert info.value.field == "r"


# ------------------------------------------------------------------------------------------- removal


@pytest.mark.parametrize("init", ["pissa", "olora", "nlora"])
@pytest.mark.parametrize("how", ["delete_adapter", "unload"])
def test_removal_restores_original_weights(llama, init, how):
    base = copy.deepcopy(llama)
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peftkit.get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                    init_lora_weights=init))
    perturb(model.named_parameters())  # training moves A and B; removal must still restore W exactly
    if how == "delete_adapter":
        model.delete_adapter("default")
        plain = model.model
    else:
        plain = model.unload()
    assert not hosts(model)
    restored = dict(plain.named_parameters())
    assert set(restored) == set(originals)
    # W_res + taken in fp32: NLoRA's taken part is larger than W (pinv of W[I, I]), so its rounding is larger
    tol = 1e-5 if init == "nlora" else 1e-6
    for name, w in originals.items():
        assert rel_err(restored[name], w) < tol, name


# ------------------------------------------------------------------------------------------- export


CONVERSIONS = [
    ("pissa", {"convert_to_original_base": True}, {}),
    ("pissa", {"path_initial_model_for_weight_conversion": "unused-initial-adapter"}, {}),
    ("olora", {"convert_to_original_base": True}, {}),
    ("olora", {"path_initial_model_for_weight_conversion": "unused-initial-adapter"}, {}),
    ("pissa_niter_2", {"convert_to_original_base": True}, {"use_rslora": True}),
    ("pissa", {"convert_to_original_base": True},
     {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"up_proj": 3}, "use_rslora": True}),
    ("nlora", {"convert_to_original_base": True}, {}),
    ("pissa", {"convert_to_original_base": True}, {"use_dora": True}),  # m stays; n is the same on either base
]


@pytest.mark.parametrize("init,save_kw,extra", CONVERSIONS, ids=range(len(CONVERSIONS)))
def test_rank_2r_export_loads_in_peft_on_original_base(llama, tmp_path, init, save_kw, extra):
    import peft

    r, alpha = 4, 8
    pristine = copy.deepcopy(llama)
    model = adapted(llama, init, LLAMA_TARGETS, r=r, alpha=alpha, **extra)
    assert perturb(model.named_parameters(), scale=0.05) > 0
    x = token_ids()
    trained = logits(model, x)
    assert not close(trained, logits(pristine, x), 1e-3)  # training changed the function

    model.save_pretrained(tmp_path, **save_kw)
    assert close(logits(model, x), trained, 1e-7)  # saving did not touch the model
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * r and cfg["init_lora_weights"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    ranks = {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks and all(v == 2 * extra.get("rank_pattern", {}).get(k.split(".")[-3], r) for k, v in ranks.items())

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    assert close(logits(theirs, x), trained, 1e-5)


# ------------------------------------------------------------------------------------------- vs peft


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft(llama, init):
    import peft

    cfg = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=init)
    theirs = peft_lora_modules(peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(**cfg)))
    ours = hosts(peftkit.get_peft_model(copy.deepcopy(llama), LoraConfig(**cfg)))
    assert set(theirs) == set(ours)
    for path, host in ours.items():
        pl = theirs[path]
        p_res = pl.get_base_layer().weight.detach().double()
        p_sba = pl.scaling["default"] * pl.lora_B["default"].weight.double() @ pl.lora_A["default"].weight.double()
        ad = host.adapters["default"]
        assert rel_err(residual2d(host), p_res) < 1e-4, path
        assert rel_err(sba(ad), p_sba.detach()) < 1e-4, path

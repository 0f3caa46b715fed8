"""BA-LoRA (spec 1.39): PiSSA-initialized LoRA plus consistency, diversity and SVD regularizers on the output.

The three terms against slow loop-based twins (NLG and NLU), zero consistency when the adapter output equals the
base, no gradient into the reference but into the adapter, the PiSSA init kept in the adapter (the base stays
the pre-trained model), merge, save -> load, config errors and a short run of the training loop.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import peftkit
from peftkit import AdapterModel, ConfigError
from peftkit.checkpoint.peft_format import adapter_state
from peftkit.methods.ba_lora import BaLoraAdapter, BaLoraConfig
from peftkit.train.loop import TrainArgs, train
from train.loop_helpers import TARGETS, batches_fn, read_metrics, tiny_base  # tests/ is on sys.path

from ._helpers import close, logits, tiny_llama, token_ids

NAMES = ("ba_lora_consistency", "ba_lora_diversity", "ba_lora_svd")


def unit(task: str = "nlg", k: int = 2) -> BaLoraConfig:
    """Weights 1 so output_losses returns the raw terms."""
    return BaLoraConfig(target_modules=["q_proj"], ba_task=task, ba_svd_k=k, ba_lambda_consistency=1.0,
                        ba_lambda_diversity=1.0, ba_lambda_svd=1.0)


def singular_values(m: torch.Tensor) -> list[float]:
    """sqrt of the eigenvalues of M M^T (or M^T M), descending: the singular values without an SVD routine."""
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return sorted((math.sqrt(max(e, 0.0)) for e in torch.linalg.eigvalsh(g).tolist()), reverse=True)


def svd_term(matrices: list[torch.Tensor], k: int) -> float:
    ratios = [sum(sv[:k]) / (sum(sv) + 1e-10) for sv in map(singular_values, matrices)]
    return -sum(ratios) / len(ratios)


def slow_nlg(z: torch.Tensor, z0: torch.Tensor, k: int) -> tuple[float, float, float]:
    b, t, v = z.shape
    zl, z0l = z.tolist(), z0.tolist()
    kl = ent = 0.0
    for i in range(b):
        for j in range(t):
            p = [math.exp(e) for e in zl[i][j]]
            p = [e / sum(p) for e in p]
            q = [math.exp(e) for e in z0l[i][j]]
            q = [e / sum(q) for e in q]
            kl += sum(q[c] * math.log(q[c] / p[c]) for c in range(v))
            ent += -sum(p[c] * math.log(p[c]) for c in range(v))
    return kl / b, -ent / (b * t), svd_term([z[i] for i in range(b)], k)


def slow_nlu(z: torch.Tensor, z0: torch.Tensor, k: int) -> tuple[float, float, float]:
    n, d = z.shape
    zl, z0l = z.tolist(), z0.tolist()
    mse = 0.0
    for row, row0 in zip(zl, z0l, strict=True):
        nz, nz0 = math.sqrt(sum(e * e for e in row)), math.sqrt(sum(e * e for e in row0))
        mse += sum((row[c] / nz - row0[c] / nz0) ** 2 for c in range(d))
    mean = [sum(zl[i][c] for i in range(n)) / n for c in range(d)]
    off = 0.0
    for a in range(d):
        for c in range(d):
            if a != c:
                cov = sum((zl[i][a] - mean[a]) * (zl[i][c] - mean[c]) for i in range(n)) / (n - 1)
                off += cov ** 2
    return mse / (n * d), off / d, svd_term([z], k)


def test_nlg_terms_match_slow_twin():
    g = torch.Generator().manual_seed(0)
    z, z0 = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    got = BaLoraAdapter.output_losses(unit("nlg"), z, z0)
    want = slow_nlg(z.double(), z0.double(), 2)
    for name, w in zip(NAMES, want, strict=True):
        assert got[name].item() == pytest.approx(w, rel=1e-5, abs=1e-7), name


def test_nlu_terms_match_slow_twin():
    g = torch.Generator().manual_seed(1)
    z, z0 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    got = BaLoraAdapter.output_losses(unit("nlu", k=1), z, z0)
    want = slow_nlu(z.double(), z0.double(), 1)
    for name, w in zip(NAMES, want, strict=True):
        assert got[name].item() == pytest.approx(w, rel=1e-5, abs=1e-7), name


def test_weights_scale_the_terms():
    g = torch.Generator().manual_seed(2)
    z, z0 = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    raw = BaLoraAdapter.output_losses(unit("nlg", k=3), z, z0)
    weighted = BaLoraAdapter.output_losses(BaLoraConfig(target_modules=["q_proj"]), z, z0)  # (1e-4, 3e-4, 1e-4)
    for name, lam in zip(NAMES, (1e-4, 3e-4, 1e-4), strict=True):
        assert weighted[name].item() == pytest.approx(lam * raw[name].item(), rel=1e-6)


def build(**fields):
    base = tiny_llama()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", BaLoraConfig(target_modules=["q_proj", "v_proj"], r=4, **fields))
    return model, base


@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_consistency_is_zero_when_the_adapter_output_equals_the_base(task):
    model, base = build(ba_task=task)
    ids = token_ids()
    out = logits(model, ids)
    assert torch.equal(out, logits(base, ids))  # PiSSA init, base untouched: exactly the pre-trained output
    with model.disabled():
        ref = logits(model, ids)
    assert torch.equal(ref, logits(base, ids))  # the reference is the pre-trained model, not W_res
    losses = model.output_losses(out if task == "nlg" else out[:, -1], lambda: ref if task == "nlg" else ref[:, -1])
    assert losses["ba_lora_consistency"].item() == 0.0
    assert losses["ba_lora_diversity"].item() != 0.0 and losses["ba_lora_svd"].item() < 0.0


def test_pissa_factors_kept_in_the_adapter_not_cut_from_the_base():
    model, base = build()
    host = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    ad = host.adapters["default"]
    assert torch.equal(host.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    w = host.base_layer.weight.detach().double()
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    principal = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]  # what PiSSA's factors hold: s B0 A0 = top-4 part of W
    init = ad.scaling * ad.ba_init_B.double() @ ad.ba_init_A.double()
    assert (init - principal).abs().max() < 1e-4
    assert torch.equal(ad.lora_A, ad.ba_init_A) and torch.equal(ad.delta_weight(), torch.zeros_like(w.float()))


def test_regularizer_gradients_reach_the_adapter_not_the_reference():
    model, base = build()
    ids = token_ids()
    with model.disabled(), torch.no_grad():
        ref_base = model(ids).logits
    leaf = torch.zeros((), requires_grad=True)  # a reference that would carry a gradient if it were not detached
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    out = model(ids).logits
    losses = model.output_losses(out, lambda: ref_base + leaf)
    sum(losses.values()).backward()
    assert leaf.grad is None
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    raw = BaLoraAdapter.output_losses(unit(), out.detach().requires_grad_(True), ref_base + leaf)
    assert raw["ba_lora_consistency"].item() > 0  # the model moved off the reference
    sum(raw.values()).backward()  # the method itself detaches the reference too
    assert leaf.grad is None


def test_merge_equals_unmerged_and_save_load_reproduces(tmp_path):
    model, base = build(init_lora_weights="pissa")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = token_ids()
    out = logits(model, ids)
    assert not close(out, logits(base, ids), 1e-3)
    model.merge()
    assert close(logits(model, ids), out, 1e-5)
    model.unmerge()
    keys = {k.split("_proj.", 1)[1] for k in adapter_state(model, "default")}  # suffix after the module path
    assert keys == {"lora_A.weight", "lora_B.weight", "ba_init_A", "ba_init_B"}
    peftkit.save_adapter(model, tmp_path, "default")
    loaded = AdapterModel(copy.deepcopy(base))  # the original pre-trained base: nothing was cut out of it
    peftkit.load_adapter(loaded, tmp_path, "default")
    assert torch.equal(logits(loaded, ids), out)


def test_plain_init_has_no_init_buffers():
    model, base = build(init_lora_weights=True)
    ad = model.model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    assert not ad.keeps_init and set(ad.disk_names()) == {"lora_A", "lora_B"}


@pytest.mark.parametrize("field, value", [("ba_task", "cls"), ("ba_svd_k", 0), ("ba_lambda_consistency", -1.0),
                                          ("ba_lambda_svd", float("nan")), ("ba_lambda_diversity", True),
                                          ("use_dora", True)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        BaLoraConfig(target_modules=["q_proj"], **{field: value})
    assert e.value.field == field


def test_config_defaults():
    config = BaLoraConfig(target_modules=["q_proj"])
    assert config.method == "ba_lora" and config.peft_type == "BA_LORA" and config.init_lora_weights == "pissa"
    assert (config.ba_lambda_consistency, config.ba_lambda_diversity, config.ba_lambda_svd) == (1e-4, 3e-4, 1e-4)
    assert config.for_original_base() is config


def test_short_training_run_lowers_the_loss_and_calls_the_regularizers(tmp_path, monkeypatch):
    calls = []
    original = BaLoraAdapter.output_losses.__func__

    def spy(cls, config, logits, reference):
        calls.append(reference.requires_grad)
        return original(cls, config, logits, reference)

    monkeypatch.setattr(BaLoraAdapter, "output_losses", classmethod(spy))
    model = AdapterModel(tiny_base())
    model.add_adapter("default", BaLoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, ba_lambda_consistency=1e-2,
                                              ba_lambda_diversity=1e-2, ba_lambda_svd=1e-2))
    train(model, lambda epoch: batches_fn(epoch, pattern=True),
          TrainArgs(output_dir=str(tmp_path), epochs=6, lr=1e-2, warmup_ratio=0.0, schedule="constant"))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(calls) == len(losses) == 30 and not any(calls)  # once per step, reference without grad
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses

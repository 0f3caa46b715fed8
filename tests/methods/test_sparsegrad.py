"""SparseGrad: HOSVD bases shared per layer type, W = V W~ U, top-k transformed gradients, exact merge."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit import AdapterModel, Calibration, ConfigError, UnsupportedLayerError
from peftkit.methods.sparsegrad import SparseGradAdapter, SparseGradConfig, layer_type

from ._helpers import tiny_llama, token_ids

pytest.importorskip("transformers")

MLP = ["up_proj", "down_proj"]


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": (ids := token_ids(seed=10 + i)), "labels": ids} for i in range(n)]


def _wrapped(targets=MLP, **fields) -> AdapterModel:
    model = AdapterModel(tiny_llama())
    config = SparseGradConfig(target_modules=targets, **fields)
    model.add_adapter("default", config, calibration=Calibration(_batches()))
    return model


def _adapters(model: AdapterModel) -> dict[str, SparseGradAdapter]:
    return {p: h.adapters["default"] for p, h in model.hosts()}


def _base_grads(paths) -> dict[str, torch.Tensor]:
    """Mean dL/dW over the calibration batches on the plain base model."""
    base = tiny_llama()
    base.requires_grad_(False)
    weights = {p: base.get_submodule(p).weight.requires_grad_(True) for p in paths}
    for b in _batches():
        base(**b).loss.backward()
    return {p: w.grad / len(_batches()) for p, w in weights.items()}


def _perturb(model: AdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in _adapters(model).values():
            a.sparsegrad_delta.normal_(0, 0.05, generator=g)


def test_layer_type() -> None:
    assert layer_type("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert layer_type("transformer.h.0.attn.c_proj") == "transformer.h.*.attn.c_proj"
    assert layer_type("fc1") == "fc1" and layer_type("0.fc") == "*.fc"


def test_bases_shared_per_type_and_orthogonal() -> None:
    adapters = _adapters(_wrapped())
    up0, up1 = adapters["model.layers.0.mlp.up_proj"], adapters["model.layers.1.mlp.up_proj"]
    down0 = adapters["model.layers.0.mlp.down_proj"]
    assert up0.sparsegrad_U is up1.sparsegrad_U and up0.sparsegrad_V is up1.sparsegrad_V
    assert up0.sparsegrad_U.shape == (64, 64) and up0.sparsegrad_V.shape == (128, 128)
    assert down0.sparsegrad_U.shape == (128, 128)
    for a in (up0, down0):
        for m in (a.sparsegrad_U.double(), a.sparsegrad_V.double()):
            torch.testing.assert_close(m @ m.T, torch.eye(m.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        assert not torch.allclose(a.sparsegrad_U, torch.eye(a.sparsegrad_U.shape[0]))  # calibrated, not identity


def test_bases_are_the_hosvd_factors() -> None:
    """Against an SVD of the unfoldings of the stacked gradients (L, out, in): same leading singular vectors."""
    model = _wrapped()
    paths = [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]
    grads = _base_grads(paths)
    stacked = torch.stack([grads[p].double() for p in paths])  # (L, out, in)
    out_mode = stacked.permute(1, 0, 2).reshape(stacked.shape[1], -1)  # (out, L*in)
    in_mode = stacked.permute(2, 0, 1).reshape(stacked.shape[2], -1)  # (in, L*out)
    a = _adapters(model)[paths[0]]
    for basis, mode in ((a.sparsegrad_V.double(), out_mode), (a.sparsegrad_U.double().T, in_mode)):
        u, s, _ = torch.linalg.svd(mode, full_matrices=False)
        top = 8  # leading directions with well separated singular values
        assert (s[:top] / s[1:top + 1]).min() > 1.001
        cos = (basis[:, :top] * u[:, :top]).sum(0).abs()  # (top,), sign-free
        torch.testing.assert_close(cos, torch.ones(top, dtype=torch.float64), atol=1e-4, rtol=0)


def test_reparametrization_round_trip() -> None:
    """Before any update, V (V^T W U^T) U = W."""
    model = _wrapped()
    for a in _adapters(model).values():
        w, u, v = a.ops.weight2d().double(), a.sparsegrad_U.double(), a.sparsegrad_V.double()
        w_tilde = v.T @ w @ u.T  # (out, in)
        torch.testing.assert_close(v @ w_tilde @ u, w, atol=1e-4 * w.abs().max().item(), rtol=0)


def test_output_unchanged_at_init() -> None:
    batch, model = _batches(1)[0], _wrapped()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny_llama()(**batch).logits)


def test_gradient_is_the_transformed_weight_gradient() -> None:
    """dL/dD~ = V^T (dL/dW) U^T at init, where dL/dW is the base model's gradient."""
    model = _wrapped()
    for b in _batches():
        (model(**b).loss / len(_batches())).backward()
    grads = _base_grads([p for p, _ in model.hosts()])
    for path, a in _adapters(model).items():
        expected = a.sparsegrad_V.T @ grads[path] @ a.sparsegrad_U.T  # (out, in)
        torch.testing.assert_close(a.sparsegrad_delta.grad, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fields, k", [(dict(keep_ratio=0.01), 82), (dict(keep_count=7), 7)])
def test_gradient_keeps_exactly_k_largest(fields, k) -> None:
    model = _wrapped(**fields)
    model(**_batches(1)[0]).loss.backward()
    dense = {p: a.sparsegrad_delta.grad.clone() for p, a in _adapters(model).items()}
    model.pre_step_hook(0)
    for path, a in _adapters(model).items():
        g = a.sparsegrad_delta.grad
        assert a.k == k and int((g != 0).sum()) == k
        kept = g != 0
        assert torch.equal(g[kept], dense[path][kept])
        assert dense[path].abs()[kept].min() >= dense[path].abs()[~kept].max()


def test_sgd_step_updates_only_k_entries() -> None:
    model = _wrapped(keep_count=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**_batches(1)[0]).loss.backward()
    model.pre_step_hook(0)
    opt.step()
    for a in _adapters(model).values():
        assert int((a.sparsegrad_delta != 0).sum()) == 5


def test_merge_is_exact_and_unmerge_restores() -> None:
    model = _wrapped()
    _perturb(model)
    batch = _batches(1)[0]
    before = {p: h.ops.weight2d().clone() for p, h in model.hosts()}
    with torch.no_grad():
        unmerged = model(**batch).logits
        for a in _adapters(model).values():
            v, d, u = a.sparsegrad_V.double(), a.sparsegrad_delta.double(), a.sparsegrad_U.double()
            torch.testing.assert_close(a.delta_weight().double(), v @ d @ u, atol=1e-6, rtol=0)
        model.merge()
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge()
        for path, h in model.hosts():
            torch.testing.assert_close(h.ops.weight2d(), before[path], atol=1e-6, rtol=0)


def test_delete_restores_the_base_exactly() -> None:
    model = _wrapped()
    _perturb(model)
    model.delete_adapter("default")
    assert not list(model.hosts())
    pristine = tiny_llama()
    for (n, p), (m, q) in zip(model.model.named_parameters(), pristine.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)


def test_save_load_round_trip(tmp_path) -> None:
    from safetensors.torch import load_file

    model = _wrapped()
    _perturb(model)
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    peftkit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.sparsegrad_U.model.layers.*.mlp.up_proj" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.sparsegrad_delta" in keys
    assert len(keys) == 4 + 4  # 4 deltas, U and V of 2 layer types
    loaded = AdapterModel(copy.deepcopy(tiny_llama()))
    peftkit.load_adapter(loaded, tmp_path)  # no calibration data needed
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


@pytest.mark.parametrize("fields, field", [
    (dict(keep_ratio=0), "keep_ratio"), (dict(keep_ratio=1.5), "keep_ratio"), (dict(keep_ratio=True), "keep_ratio"),
    (dict(keep_count=0), "keep_count"), (dict(keep_count=2.5), "keep_count"),
])
def test_bad_config_names_the_field(fields, field) -> None:
    with pytest.raises(ConfigError) as info:
        SparseGradConfig(**fields)
    assert info.value.field == field


def test_needs_calibration_and_linear_layers() -> None:
    model = AdapterModel(tiny_llama())
    with pytest.raises(ConfigError, match="calibration"):
        model.add_adapter("a", SparseGradConfig(target_modules=MLP))
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        model.add_adapter("a", SparseGradConfig(target_modules=["embed_tokens"]), calibration=Calibration(_batches()))

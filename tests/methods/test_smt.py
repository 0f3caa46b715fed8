"""SMT: global top-N block selection from calibration gradients, block-sparse training, exact merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftkit
from peftkit import AdapterModel, Calibration, ConfigError, UnsupportedLayerError
from peftkit.methods.smt import SCORES, SMTAdapter, SMTConfig, block_scores

from ._helpers import tiny_llama, token_ids

pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
BS = 16


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": (ids := token_ids(seed=20 + i)), "labels": ids} for i in range(n)]


def _wrapped(**fields) -> AdapterModel:
    model = AdapterModel(tiny_llama())
    config = SMTConfig(**({"target_modules": TARGETS, "block_size": BS, "num_blocks": 10} | fields))
    model.add_adapter("default", config, calibration=Calibration(_batches()))
    return model


def _adapters(model: AdapterModel) -> dict[str, SMTAdapter]:
    return {p: h.adapters["default"] for p, h in model.hosts()}


def _selected(model: AdapterModel) -> set[tuple[str, int, int]]:
    return {(p, int(r), int(c)) for p, a in _adapters(model).items() for r, c in a.smt_block_index.tolist()}


def _dense_grads(model_or_base, paths) -> dict[str, torch.Tensor]:
    """Mean dL/dW of a plain model (requires_grad switched on for `paths` only)."""
    model_or_base.requires_grad_(False)
    weights = {p: model_or_base.get_submodule(p).weight.requires_grad_(True) for p in paths}
    for b in _batches():
        (model_or_base(**b).loss / len(_batches())).backward()
    return {p: w.grad for p, w in weights.items()}


def _perturb(model: AdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in _adapters(model).values():
            a.smt_delta.normal_(0, 0.05, generator=g)


def _slow_scores(g: torch.Tensor, bs: int, score: str) -> torch.Tensor:
    out = torch.zeros(g.shape[0] // bs, g.shape[1] // bs)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            blk = g[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
            out[i, j] = {"mean_abs": blk.mean().abs(), "abs_mean": blk.abs().mean(), "l1": blk.abs().sum(),
                         "l2": blk.norm()}[score]
    return out


@pytest.mark.parametrize("score", SCORES)
def test_block_scores_match_a_loop(score) -> None:
    g = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block_scores(g, 4, score), _slow_scores(g, 4, score))


def test_selection_is_the_global_top_n() -> None:
    model = _wrapped()
    paths = [p for p, _ in model.hosts()]
    grads = _dense_grads(tiny_llama(), paths)
    ranked = []
    for p in paths:
        scores = _slow_scores(grads[p], BS, "mean_abs")  # (R, C)
        ranked += [(float(scores[i, j]), p, i, j) for i in range(scores.shape[0]) for j in range(scores.shape[1])]
    ranked.sort(reverse=True)
    assert _selected(model) == {(p, i, j) for _, p, i, j in ranked[:10]}
    counts = {p: a.smt_delta.shape[0] for p, a in _adapters(model).items()}
    assert sum(counts.values()) == 10 and min(counts.values()) == 0  # some layers get no block


def test_separate_budgets_per_group() -> None:
    model = _wrapped(block_budgets={"self_attn": 3, r"mlp\.up": 2}, num_blocks=4)
    counts = {"self_attn": 0, "mlp.up": 0, "mlp.down": 0}
    for p, a in _adapters(model).items():
        counts[next(k for k in counts if k in p)] += a.smt_delta.shape[0]
    assert counts == {"self_attn": 3, "mlp.up": 2, "mlp.down": 4}


def test_block_size_clamps_for_small_layers() -> None:
    adapters = _adapters(_wrapped(block_size=256, num_blocks=100))
    assert adapters["model.layers.0.self_attn.q_proj"].bs == 64
    assert adapters["model.layers.0.self_attn.v_proj"].bs == 32  # (32, 64)
    assert sum(a.smt_delta.shape[0] for a in adapters.values()) == 2 * (1 + 2 + 2 + 2)  # every block


def test_output_equals_base_at_init() -> None:
    batch, model = _batches(1)[0], _wrapped()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny_llama()(**batch).logits)


def test_gradient_is_the_dense_gradient_restricted_to_the_blocks() -> None:
    """At a perturbed point: dL/d delta_i equals the (r_i, c_i) block of dL/dW of the merged dense model."""
    model = _wrapped()
    _perturb(model)
    for b in _batches():
        (model(**b).loss / len(_batches())).backward()
    adapters = _adapters(model)
    dense_model = copy.deepcopy(model)
    dense_model.merge()
    dense = _dense_grads(dense_model.model, [f"{p}.base_layer" for p in adapters])
    for path, a in adapters.items():
        g = dense[f"{path}.base_layer"]
        for i, (r, c) in enumerate(a.smt_block_index.tolist()):
            torch.testing.assert_close(a.smt_delta.grad[i], g[r * BS:(r + 1) * BS, c * BS:(c + 1) * BS],
                                       atol=1e-6, rtol=1e-4)


def test_unselected_blocks_bit_identical_after_training() -> None:
    model = _wrapped()
    original = {p: h.ops.weight2d().clone() for p, h in model.hosts()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for b in _batches() * 3:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    model.merge()
    changed = 0
    for path, h in model.hosts():
        a, w = h.adapters["default"], h.ops.weight2d()
        mask = torch.zeros(w.shape[0] // BS, w.shape[1] // BS, dtype=torch.bool)
        for r, c in a.smt_block_index.tolist():
            mask[r, c] = True
            changed += not torch.equal(w[r * BS:(r + 1) * BS, c * BS:(c + 1) * BS],
                                       original[path][r * BS:(r + 1) * BS, c * BS:(c + 1) * BS])
        keep = mask.repeat_interleave(BS, 0).repeat_interleave(BS, 1)  # (out, in)
        assert torch.equal(w[~keep], original[path][~keep])
    assert changed == 10


def test_merge_is_exact() -> None:
    model = _wrapped()
    _perturb(model)
    batch = _batches(1)[0]
    for a in _adapters(model).values():
        slow = torch.zeros(a.ops.out_features, a.ops.in_features)
        for i, (r, c) in enumerate(a.smt_block_index.tolist()):
            slow[r * BS:(r + 1) * BS, c * BS:(c + 1) * BS] = a.smt_delta[i].detach()
        assert torch.equal(a.delta_weight(), slow)
    with torch.no_grad():
        unmerged = model(**batch).logits
        model.merge()
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_save_load_records_the_per_layer_counts(tmp_path) -> None:
    model = _wrapped()
    _perturb(model)
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    peftkit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["layer_blocks"]
    counts = {p: a.smt_delta.shape[0] for p, a in _adapters(model).items()}
    assert saved == {p.replace(".", r"\."): n for p, n in counts.items()}
    loaded = AdapterModel(tiny_llama())
    peftkit.load_adapter(loaded, tmp_path)  # no calibration data needed
    assert _selected(loaded) == _selected(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_loading_without_counts_names_the_field() -> None:
    model = AdapterModel(tiny_llama())
    with pytest.raises(ConfigError) as info:
        model.plan_adapter("a", SMTConfig(target_modules=TARGETS), initialize=False)
    assert info.value.field == "layer_blocks"


@pytest.mark.parametrize("fields, field", [
    (dict(block_size=0), "block_size"), (dict(num_blocks=0), "num_blocks"), (dict(score="max"), "score"),
    (dict(block_budgets={"mlp": 0}), "block_budgets['mlp']"), (dict(block_budgets={"(": 1}), "block_budgets"),
    (dict(layer_blocks={"x": -1}), "layer_blocks"),
])
def test_bad_config_names_the_field(fields, field) -> None:
    with pytest.raises(ConfigError) as info:
        SMTConfig(**fields)
    assert info.value.field == field


def test_unsupported_layers() -> None:
    model = AdapterModel(tiny_llama())
    with pytest.raises(UnsupportedLayerError, match="block_size"):
        model.add_adapter("a", SMTConfig(target_modules=["q_proj"], block_size=24), calibration=Calibration(_batches()))
    with pytest.raises(UnsupportedLayerError, match="embedding"):
        model.add_adapter("a", SMTConfig(target_modules=["embed_tokens"]), calibration=Calibration(_batches()))

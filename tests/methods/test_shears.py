"""Shears (spec 1.31): the Wanda mask against a slow twin from the calibration inputs, masked base weights stay zero
and delete restores the base, nested elastic-rank slices, r_max-only sampling == LoRA on the sparse base, the eval
rank (heuristic median / per-module choice) saved and loaded, exact dense merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, Calibration, ConfigError, UnsupportedLayerError, load_adapter, save_adapter
from peftkit.methods.shears import ShearsAdapter, ShearsConfig, wanda_mask

from ._helpers import close, hosts, logits, perturb

TARGETS = ["q", "up", "down"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(torch.tanh(self.q(x)))))  # (N, 8)


def _base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _batches(seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(10, 16, generator=g) * torch.linspace(0.1, 3, 16)} for _ in range(2)]


def _calibration() -> Calibration:
    return Calibration(_batches(), lambda m, b: m(b["x"]).sum())


def _model(base: nn.Module | None = None, **cfg) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base if base is not None else _base()))
    fields = dict(target_modules=TARGETS, r=8, lora_alpha=16, shears_rank_choices=[8, 6, 4]) | cfg
    model.add_adapter("default", ShearsConfig(**fields), calibration=_calibration())
    return model


def _adapters(model: AdapterModel) -> dict[str, ShearsAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def _train(model: AdapterModel, steps: int) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    for step in range(1, steps + 1):
        model(torch.randn(8, 16, generator=g)).square().mean().backward()
        opt.step()
        model.step_hook(step, opt)
        opt.zero_grad()
    model.eval()


def test_wanda_mask_matches_slow_twin():
    base = _base()
    model = _model(base, shears_sparsity=0.5)
    x = torch.cat([b["x"] for b in _batches()])  # (N, 16): the input of layer q
    w = base.q.weight.detach()
    col = x.norm(dim=0)  # ||X_j||
    ad = _adapters(model)["q"]
    for i in range(w.shape[0]):
        order = sorted(range(16), key=lambda j: float(w[i, j].abs() * col[j]))
        assert set((~ad.shears_mask[i]).nonzero().flatten().tolist()) == set(order[:8])
    assert torch.equal(wanda_mask(w, x.T @ x / x.shape[0], 0.25).sum(1), torch.full((16,), 12))


def test_masked_weights_stay_zero_and_delete_restores_the_base():
    base = _base()
    model = _model(base, shears_sparsity=0.6)
    _train(model, 4)
    for path, ad in _adapters(model).items():
        w = model.model.get_submodule(path).base_layer.weight
        assert torch.equal(w[~ad.shears_mask], torch.zeros(int((~ad.shears_mask).sum())))
        assert torch.equal(w[ad.shears_mask], base.get_submodule(path).weight[ad.shears_mask])
        assert int((~ad.shears_mask).sum(1)[0]) == int(0.6 * w.shape[1])
    model.delete_adapter("default")
    for path in TARGETS:
        assert torch.equal(model.model.get_submodule(path).weight, base.get_submodule(path).weight)


def test_nested_slices_are_the_first_components():
    base, x = _base(), torch.randn(5, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=2)
    ad = _adapters(model)["q"]
    masked_w = base.q.weight * ad.shears_mask
    for k in (8, 6, 4, 1):
        ad.set_eval_rank(k)
        twin = x @ masked_w.T + base.q.bias + ad.scaling * x @ ad.lora_A[:k].T @ ad.lora_B[:, :k].T
        assert close(model.model.q(x), twin)
        assert close(ad.delta_weight(), ad.scaling * ad.lora_B[:, :k] @ ad.lora_A[:k])


def test_rmax_only_sampling_is_lora_on_the_sparse_base():
    base, x = _base(), torch.randn(5, 16)
    model = _model(base, shears_rank_choices=[8], lora_dropout=0.0)
    perturb(model.named_parameters(), seed=2)
    model.train()
    for step in range(1, 6):
        model.step_hook(step)
        assert all(a.rank == 8 for a in _adapters(model).values())
        ad = _adapters(model)["q"]
        twin = x @ (base.q.weight * ad.shears_mask).T + base.q.bias + ad.scaling * x @ (ad.lora_B @ ad.lora_A).T
        assert close(model.model.q(x), twin)


def test_training_samples_from_the_choices_and_eval_uses_the_median():
    model = _model(shears_rank_choices=[8, 2, 4, 6])
    ad = _adapters(model)["up"]
    assert ad.eval_rank == 4 and ad.config.rank_choices == (8, 6, 4, 2)
    torch.manual_seed(0)
    drawn = set()
    for step in range(60):
        ad.on_step(step)
        drawn.add(ad.train_rank)
    assert drawn == {8, 6, 4, 2}
    ad.train()
    assert ad.rank == ad.train_rank
    ad.eval()
    assert ad.rank == 4


@pytest.mark.parametrize("r,choices,median", [(32, None, 24), (4, None, 3), (8, [8], 8), (8, [3, 7], 3)])
def test_default_choices_and_heuristic(r, choices, median):
    cfg = ShearsConfig(r=r, shears_rank_choices=choices)
    assert cfg.eval_rank == median
    if choices is None:
        assert cfg.rank_choices == (r, -(-3 * r // 4), -(-r // 2))


def test_save_load_with_chosen_ranks(tmp_path):
    base, x = _base(), torch.randn(4, 16)
    model = _model(base, shears_sparsity=0.4)
    _train(model, 3)
    perturb(model.named_parameters(), seed=9)
    _adapters(model)["up"].set_eval_rank(8)
    _adapters(model)["down"].set_eval_rank(4)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["shears_rank_pattern"] == {"up": 8, "down": 4} and cfg["peft_type"] == "SHEARS"  # q keeps the median
    fresh = AdapterModel(copy.deepcopy(base))
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), want)
    assert {p: a.eval_rank for p, a in _adapters(fresh).items()} == {"q": 6, "up": 8, "down": 4}
    assert torch.equal(fresh.model.up.base_layer.weight, model.model.up.base_layer.weight)  # pruned again on load
    fresh.delete_adapter("default")
    assert torch.equal(fresh.model.up.weight, base.up.weight)


def test_dense_merge_is_exact_and_sparse_merge_is_masked():
    base, x = _base(), torch.randn(4, 16)
    model = _model(base)
    perturb(model.named_parameters(), seed=4)
    y = logits(model, x)
    model.merge()
    assert close(logits(model, x), y)
    model.unmerge()
    ad = _adapters(model)["q"]
    sparse = ad.sparse_delta_weight()
    assert torch.equal(sparse[~ad.shears_mask], torch.zeros(int((~ad.shears_mask).sum())))
    assert torch.equal(sparse[ad.shears_mask], ad.delta_weight()[ad.shears_mask])


def test_needs_calibration_and_linear_layers():
    model = AdapterModel(_base())
    with pytest.raises(ConfigError) as e:
        model.add_adapter("default", ShearsConfig(target_modules=TARGETS, r=4))
    assert e.value.field == "calibration"
    emb = AdapterModel(nn.Sequential(nn.Embedding(10, 8)))
    with pytest.raises(UnsupportedLayerError):
        emb.add_adapter("default", ShearsConfig(target_modules=["0"], r=4), calibration=_calibration())


@pytest.mark.parametrize("kw,field", [(dict(shears_sparsity=1.0), "shears_sparsity"),
                                      (dict(shears_sparsity=-0.1), "shears_sparsity"),
                                      (dict(shears_rank_choices=[]), "shears_rank_choices"),
                                      (dict(shears_rank_choices=[0]), "shears_rank_choices"),
                                      (dict(shears_rank_choices=[9]), "shears_rank_choices"),
                                      (dict(shears_eval_rank=9), "shears_eval_rank"),
                                      (dict(shears_rank_pattern={"q": 0}), "shears_rank_pattern['q']"),
                                      (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
                                      (dict(init_lora_weights="pissa"), "init_lora_weights")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        ShearsConfig(r=8, **kw)
    assert e.value.field == field


def test_set_eval_rank_checks_the_range():
    ad = _adapters(_model())["q"]
    with pytest.raises(ConfigError):
        ad.set_eval_rank(9)

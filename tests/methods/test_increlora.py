"""IncreLoRA (spec 1.33): the forward against a slow twin (both the factored and the hook-watched materialized
path), the importance hook against an explicit sum|dW * dL/dW| / sqrt(n), growth driven by a real optimizer (ranks
non-decreasing, the budget never exceeded and reached, new parameters registered and in the optimizer, old ones
keeping their state), the reserve ("advance learning") tolerance at init, save -> load after growth, config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import AdapterModel, CheckpointError, ConfigError, UnsupportedLayerError, load_adapter, save_adapter
from peftkit.methods.increlora import IncreLoraAdapter, IncreLoraConfig
from peftkit.train import TrainArgs, loop, train
from train.loop_helpers import TARGETS, batches_fn, tiny_base  # tests/ is on sys.path (rootdir import)

from ._helpers import close, logits, perturb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


GROW = dict(r=1, target_rank=3, init_warmup=2, incre_interval=2, top_h=2, incre_rank_num=1)


def _model(seed: int = 0, **cfg) -> AdapterModel:
    torch.manual_seed(seed)
    model = AdapterModel(Net().eval())
    model.add_adapter("default", IncreLoraConfig(target_modules=["fc1", "fc2", "fc3"], **cfg))
    return model


def _adapters(model: AdapterModel) -> dict[str, IncreLoraAdapter]:
    return {p: h.adapters["default"] for p, h in model.hosts() if hasattr(h, "adapters")}


def _step(model: AdapterModel, opt: torch.optim.Optimizer, step: int) -> bool:
    model.train()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(step))
    (model(x).square().mean() + sum(model.extra_losses().values())).backward()
    opt.step()
    changed = model.step_hook(step, opt)
    opt.zero_grad()
    return changed


def _twin(a: IncreLoraAdapter, x: torch.Tensor) -> torch.Tensor:
    """s * B diag(e) A x with every row spelled out, the reserve included."""
    e = torch.cat([*a.lora_E, a.reserve_E]).view(-1)  # (R,)
    A, B = torch.cat(list(a.lora_A)), torch.cat(list(a.lora_B), dim=1)  # (R, in), (out, R)
    return a.config.lora_alpha / (a.rank + 1e-5) * sum(e[i] * (x @ A[i]).unsqueeze(-1) * B[:, i] for i in range(len(e)))


def test_init_within_reserve_tolerance_and_exact_without_reserve() -> None:
    x = torch.randn(5, 12)
    model = _model(r=2)
    with model.disabled():
        base = logits(model, x)
    out = logits(model, x)
    assert close(out, base) and not torch.equal(out, base)  # the reserve contributes 1e-5-sized terms
    plain = _model(r=2, advance_learn=False)
    assert torch.equal(logits(plain, x), base)


def test_forward_paths_match_twin_and_merge() -> None:
    model = _model(r=2, lora_alpha=5)
    perturb(model.named_parameters(), seed=2)
    a = _adapters(model)["fc1"]
    x = torch.randn(4, 12)
    with torch.no_grad():
        twin = a.ops.module(x) + _twin(a, x)
        assert close(a.ops.module(x) + a(x, None), twin)  # eval: factored path
    a.train()
    assert close(a.ops.module(x) + a(x, None).detach(), twin)  # training: materialized path
    model.eval()
    out = logits(model, x)
    model.merge()
    assert close(logits(model, x), out)


def test_importance_hook_is_sum_abs_delta_times_grad() -> None:
    model = _model(r=2)
    perturb(model.named_parameters(), seed=3)
    a = _adapters(model)["fc1"]
    a.train()
    x = torch.randn(6, 12)
    a(x, None).square().sum().backward()
    delta = a.delta_weight().detach().requires_grad_(True)  # (out, in)
    F.linear(x, delta).square().sum().backward()
    expected = (delta.detach().abs() * delta.grad).abs().sum() / math.sqrt(delta.numel())
    assert torch.allclose(a.score, expected, rtol=1e-5)


def test_growth_with_optimizer_respects_budget_and_registers_parameters() -> None:
    model = _model(**GROW)
    layers = _adapters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = layers["fc1"].lora_A[0]
    ranks = [[a.rank for a in layers.values()]]
    for step in range(1, 13):
        changed = _step(model, opt, step)
        ranks.append([a.rank for a in layers.values()])
        assert changed == (ranks[-1] != ranks[-2])
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
    steps = zip(ranks, ranks[1:], strict=False)
    assert all(r2 >= r1 for before, after in steps for r1, r2 in zip(before, after, strict=True))  # non-decreasing
    assert all(sum(r) <= 3 * 3 for r in ranks) and sum(ranks[-1]) == 9  # never over budget; reached
    assert ranks[3] == [1, 1, 1] and sum(ranks[4]) == 3 + 2  # first round at step 4 (> init_warmup, % interval)
    assert first in opt.state and first is layers["fc1"].lora_A[0]  # old chunks keep their optimizer state
    for a in layers.values():
        assert len(list(a.parameters())) == 3 * a.rank  # (A, E, B) chunks: the first, then one per growth
        assert not a.reserve_E.any()  # budget reached: the reserve stops contributing
    assert model.step_hook(13, opt) is False


def test_growth_picks_the_most_important_modules() -> None:
    model = _model(**{**GROW, "top_h": 1, "init_warmup": 3, "incre_interval": 4})
    layers = list(_adapters(model).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 4):
        _step(model, opt, step)
    model.train()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    model(x).square().mean().backward()
    opt.step()
    expected = []
    for a in layers:  # the EMA update the allocator is about to make, by hand
        i_prev, u_prev = a.importance.sens["module"], a.importance.unc["module"]
        i_new = 0.85 * i_prev + 0.15 * a.score
        expected.append(float(i_new * (0.85 * u_prev + 0.15 * (a.score - i_new).abs())))
    model.step_hook(4, opt)
    assert [a.rank for a in layers] == [2 if i == max(range(3), key=expected.__getitem__) else 1 for i in range(3)]


def test_save_load_after_growth(tmp_path) -> None:
    model = _model(**GROW)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 7):
        _step(model, opt, step)
    model.eval()
    x = torch.randn(5, 12)
    out = logits(model, x)
    save_adapter(model, tmp_path)
    ranks = {p: a.rank for p, a in _adapters(model).items()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == {
        p: r for p, r in ranks.items() if r != 1}
    torch.manual_seed(0)
    loaded = AdapterModel(Net().eval())
    load_adapter(loaded, tmp_path)
    assert {p: a.rank for p, a in _adapters(loaded).items()} == ranks
    assert torch.equal(logits(loaded, x), out)


def test_training_loop_grows_and_learns(tmp_path) -> None:
    torch.manual_seed(0)
    model = AdapterModel(tiny_base())
    model.add_adapter("default", IncreLoraConfig(target_modules=TARGETS[:2], r=1, target_rank=2, init_warmup=2,
                                                 incre_interval=3, top_h=2))
    args = TrainArgs(output_dir=str(tmp_path), max_steps=12, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                     keep_checkpoints=None, log_every=12)
    result = train(model, lambda epoch: batches_fn(epoch, seed=1, pattern=True), args)
    assert sum(a.rank for a in _adapters(model).values()) == 2 * 4
    assert math.isfinite(result.final_loss)


def test_config_errors_name_the_field() -> None:
    bad = [({"r": 0}, "r"), ({"r": 4, "target_rank": 2}, "target_rank"), ({"incre_interval": 0}, "incre_interval"),
           ({"top_h": 0}, "top_h"), ({"beta2": 0}, "beta2"), ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
           ({"rank_pattern": {"fc1": 0}}, "rank_pattern['fc1']"), ({"lora_alpha": 0}, "lora_alpha")]
    for fields, name in bad:
        with pytest.raises(ConfigError) as info:
            IncreLoraConfig(target_modules=["fc1"], **fields)
        assert info.value.field == name, fields
    with pytest.raises(UnsupportedLayerError):
        AdapterModel(nn.Sequential(nn.Conv2d(3, 4, 3))).add_adapter("d", IncreLoraConfig(target_modules=["0"]))



def test_embedding_layer_hook_and_twin() -> None:
    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Embedding(10, 6)))
    model.add_adapter("default", IncreLoraConfig(target_modules=["0"], r=2))
    perturb(model.named_parameters(), seed=5)
    a = next(iter(_adapters(model).values()))
    ids = torch.tensor([[1, 4, 9], [0, 4, 2]])
    expected = a.ops.module(ids) + a.delta_weight().T[ids]  # (2, 3, 6): row ids of (W + dW)^T
    assert close(model(ids).detach(), expected)
    model.train()
    model(ids).square().sum().backward()
    assert a.score is not None and a.score > 0


RESUME = dict(r=1, target_rank=4, init_warmup=1, incre_interval=1, top_h=1, incre_rank_num=1, lora_dropout=0.1)


def _resume_run(out, resume: bool = False):
    torch.manual_seed(0)
    model = AdapterModel(tiny_base())
    model.add_adapter("default", IncreLoraConfig(target_modules=TARGETS, **RESUME))
    args = TrainArgs(output_dir=str(out), max_steps=6, save_every=3, lr=5e-3, seed=3, warmup_ratio=0.0,
                     log_every=6, keep_checkpoints=None)
    if resume:  # shapes changed by growth: rebuild from the checkpoint's adapter, as the resume error advises
        with pytest.raises(CheckpointError, match="load_adapter"):
            train(model, lambda e: batches_fn(e, seed=1, pattern=True), args, resume_from="latest")
        model = AdapterModel(tiny_base())
        load_adapter(model, out / "checkpoints" / "step-3" / "adapter", "default", trainable=True)
    train(model, lambda e: batches_fn(e, seed=1, pattern=True), args, resume_from="latest" if resume else None)
    return model


def test_resume_after_growth_equals_straight_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _resume_run(tmp_path / "a")
    assert max(a.rank for a in _adapters(straight).values()) > 1
    real = loop.save_checkpoint

    def save_then_crash(directory, *a, **kw):
        real(directory, *a, **kw)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            _resume_run(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step-3" / "adapter" / "adapter_config.json").read_text())
    assert saved["chunk_pattern"]  # grown before the crash
    resumed = _resume_run(tmp_path / "b", resume=True)
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key

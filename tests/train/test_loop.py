"""The training loop: what trains, that it learns, its outputs (metrics.jsonl, eval.json, loss.png, adapter/),
the method hooks (extra_losses, step_hook), schedules, gradient checkpointing, bf16 and argument validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig
from peftkit.core.host import AdaptedLayer
from peftkit.errors import DataError
from peftkit.train.loop import TrainArgs, lr_factor, train

from .loop_helpers import adapter_tensors, batches_fn, one_thread, read_metrics, tiny_base, tiny_model  # noqa: F401


def _pattern(epoch: int):
    return batches_fn(epoch, pattern=True)


def test_only_adapter_params_change(tmp_path: Path) -> None:
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = set(adapter_tensors(model))
    assert trainable and all(".adapters.default." in n for n in trainable)
    train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=3, lr=1e-2))
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == (name in trainable), name


def test_loss_decreases_on_a_learnable_task(tmp_path: Path) -> None:
    result = train(tiny_model(), _pattern, TrainArgs(output_dir=str(tmp_path), epochs=6, lr=1e-2, warmup_ratio=0.1))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert result.steps == len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert result.final_loss == losses[-1]


def test_outputs(tmp_path: Path) -> None:
    calls = []

    def eval_fn(model: AdapterModel) -> dict:
        assert not model.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"accuracy": 0.25 * len(calls), "note": "text is kept"}

    logged = []
    result = train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=4, eval_every=2,
                                                         log_every=3), eval_fn=eval_fn, on_log=logged.append)
    records = read_metrics(tmp_path)
    assert records == logged
    assert [r["step"] for r in records] == [2, 3, 4]  # eval steps, log steps and the last step
    for r in records:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s", "elapsed"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert records[0]["eval"] == {"accuracy": 0.25, "note": "text is kept"} and "eval" not in records[1]
    assert len(calls) == 2, "the final eval reuses the eval of the last step"
    assert result.eval == json.loads((tmp_path / "eval.json").read_text()) == {"accuracy": 0.5, "note": "text is kept"}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.output_dir == tmp_path and result.steps == 4


def test_adapter_dir_is_peft_format_and_reloads(tmp_path: Path) -> None:
    model = tiny_model()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]), trainable=True)
    train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=2, lr=1e-2))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "second" / "adapter_model.safetensors").is_file()
    fresh = AdapterModel(tiny_base())
    peftkit.load_adapter(fresh, tmp_path / "adapter", "default")
    trained = {n: p for n, p in model.named_parameters() if ".adapters.default." in n}
    assert all(torch.equal(trained[n], p) for n, p in fresh.named_parameters() if ".adapters.default." in n)


def test_metrics_restart_empty_on_a_fresh_run(tmp_path: Path) -> None:
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=3))
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=2))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# --- method hooks -------------------------------------------------------------------------------------------
def _first_adapter(model: AdapterModel) -> nn.Module:
    return next(h for _, h in model.hosts() if isinstance(h, AdaptedLayer)).adapters["default"]


def test_extra_losses_are_added(tmp_path: Path) -> None:
    reference = tiny_model()
    plain = train(reference, batches_fn, TrainArgs(output_dir=str(tmp_path / "plain"), max_steps=1))
    model = tiny_model()
    adapter = _first_adapter(model)
    weight = next(adapter.parameters())
    penalty = 3.0 * weight.detach().square().sum().item()
    adapter.extra_losses = lambda: {"l2": 3.0 * weight.square().sum()}  # (depends on a trained tensor)
    regularized = train(model, batches_fn, TrainArgs(output_dir=str(tmp_path / "reg"), max_steps=1))
    assert regularized.final_loss == pytest.approx(plain.final_loss + penalty, rel=1e-5)
    assert not torch.equal(next(_first_adapter(reference).parameters()), weight), "the penalty had no gradient"


def test_step_hook_once_per_optimizer_step(tmp_path: Path) -> None:
    model = tiny_model()
    seen, adapter_seen = [], []
    model.step_hook = lambda step, optimizer=None: seen.append(step)
    _first_adapter(model).on_step = adapter_seen.append
    train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=3, grad_accum=2))
    assert seen == [1, 2, 3]
    model = tiny_model()
    _first_adapter(model).on_step = adapter_seen.append
    train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=2))
    assert adapter_seen == [1, 2], "AdapterModel.step_hook reaches the adapters"


# --- schedules and steps ------------------------------------------------------------------------------------
def test_lr_factor() -> None:
    assert [lr_factor(s, 10, 3, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, 10, 3, "cosine") == 1.0 and lr_factor(3, 10, 3, "linear") == 1.0
    assert lr_factor(9, 10, 3, "linear") == pytest.approx(1 / 7)
    assert lr_factor(9, 10, 3, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 7)))


def test_logged_lr_follows_the_schedule(tmp_path: Path) -> None:
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=10, lr=1e-3, warmup_ratio=0.3,
                                                schedule="linear"))
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 10, 3, "linear") for s in range(10)])


def test_epochs_and_grad_accum_set_the_step_count(tmp_path: Path) -> None:
    result = train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), epochs=2, grad_accum=2))
    assert result.steps == 6  # 5 batches an epoch -> 3 optimizer steps
    assert [r["epoch"] for r in read_metrics(tmp_path)][2:4] == [1.0, 1.4]


def test_grad_accum_matches_one_big_batch(tmp_path: Path) -> None:
    def big(epoch: int):
        small = batches_fn(epoch, n=2)
        return [{k: torch.cat([b[k] for b in small]) for k in small[0]}]

    one = tiny_model()
    train(one, big, TrainArgs(output_dir=str(tmp_path / "one"), max_steps=1, lr=1e-2, max_grad_norm=None))
    two = tiny_model()
    train(two, lambda e: batches_fn(e, n=2), TrainArgs(output_dir=str(tmp_path / "two"), max_steps=1, lr=1e-2,
                                                       grad_accum=2, max_grad_norm=None))
    a, b = adapter_tensors(one), adapter_tensors(two)
    # token-mean losses of equal-size micro-batches with the same count of labels average to the big batch's loss
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- precision and memory -----------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_step(tmp_path: Path) -> None:
    plain, checkpointed = tiny_model(), tiny_model()
    train(plain, batches_fn, TrainArgs(output_dir=str(tmp_path / "a"), max_steps=2, lr=1e-2))
    train(checkpointed, batches_fn, TrainArgs(output_dir=str(tmp_path / "b"), max_steps=2, lr=1e-2,
                                              gradient_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    a, b = adapter_tensors(plain), adapter_tensors(checkpointed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_checkpointing_unsupported(tmp_path: Path) -> None:
    model = AdapterModel(nn.Sequential(nn.Linear(4, 4)))
    model.add_adapter("default", LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), gradient_checkpointing=True))


def test_bf16_autocast(tmp_path: Path) -> None:
    model = tiny_model()
    result = train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=2, bf16=True))
    assert math.isfinite(result.final_loss)
    assert all(p.dtype == torch.float32 for p in adapter_tensors(model).values())


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1.0), ("epochs", 0), ("max_steps", 0), ("batch_size", 1.5),
    ("grad_accum", 0), ("warmup_ratio", 1.0), ("schedule", "step"), ("max_grad_norm", 0.0), ("max_grad_norm", "1"),
    ("seed", "x"), ("eval_every", 0), ("save_every", -1), ("log_every", 0), ("keep_checkpoints", 0), ("output_dir", ""),
])
def test_train_args_validation(field: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        TrainArgs(**{field: value})
    assert info.value.field == field


def test_bad_inputs(tmp_path: Path) -> None:
    args = TrainArgs(output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(DataError, match="empty"):
        train(tiny_model(), lambda epoch: [], args)
    with pytest.raises(DataError, match="labels"):
        train(tiny_model(), lambda epoch: [{"input_ids": b["input_ids"]} for b in batches_fn(epoch)], args)
    frozen = tiny_model()
    frozen.set_trainable()
    with pytest.raises(ConfigError, match="no parameter requires grad"):
        train(frozen, batches_fn, args)
    with pytest.raises(ConfigError, match="AdapterModel"):
        train(nn.Linear(2, 2), batches_fn, args)

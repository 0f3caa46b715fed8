"""One method-agnostic training loop for an `AdapterModel`: AdamW, warmup + schedule, accumulation, clipping,
bf16 autocast, gradient checkpointing, periodic eval, exact resume from checkpoints.

Per optimizer step over a group of `grad_accum` micro-batches b_1..b_k (k < grad_accum only at an epoch's end):
    L_i = model(**b_i).loss + sum(model.extra_losses().values()) + sum(model.output_losses(logits).values())
    grad = sum_i grad(L_i / k);  clip;  model.pre_step_hook(step);  AdamW step;  scheduler step;
    model.step_hook(step, optimizer) (gradients still present);  zero_grad
Methods reach the loop only through `extra_losses()`, `output_losses()` (with the base model's logits as the
reference), `pre_step_hook()` and `step_hook()`; the loop never names a method.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.model import AdapterModel
from ..errors import ConfigError, DataError
from .args import SCHEDULES, TrainArgs, lr_factor
from .checkpoints import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_adapters,
    save_checkpoint,
)
from .plot import plot_metrics

__all__ = ["SCHEDULES", "TrainArgs", "TrainResult", "lr_factor", "train"]

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    eval: dict[str, Any]
    output_dir: Path


@dataclass
class _Window:
    """Sums since the last metrics record."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    since: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens


@dataclass
class _Run:
    """Mutable state of one run; everything a checkpoint must carry is in `progress()`."""

    model: AdapterModel
    args: TrainArgs
    batches_fn: Callable[[int], list[Batch]]
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int
    out: Path
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    last_loss: float = math.nan
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    window: _Window = field(default_factory=_Window)
    cache: tuple[int, list[Batch]] | None = None

    def batches(self) -> list[Batch]:
        if self.cache is None or self.cache[0] != self.epoch:
            self.cache = (self.epoch, self.batches_fn(self.epoch))
        return self.cache[1]

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index, "metrics": self.metrics,
                "last_loss": self.last_loss, "elapsed": self.elapsed(), "args": asdict(self.args)}


# --- setup --------------------------------------------------------------------------------------------------
def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed)


def _enable_gradient_checkpointing(model: AdapterModel) -> None:
    """Turn on the wrapped HF model's (non-reentrant) activation checkpointing, so inputs need no grad."""
    inner = model.model
    enable = getattr(inner, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    key = "activation_checkpointing_kwargs"
    if enable is None:
        enable, key = getattr(inner, "gradient_checkpointing_enable", None), "gradient_checkpointing_kwargs"
    if enable is None or not getattr(inner, "supports_gradient_checkpointing", True):
        raise ConfigError("gradient_checkpointing", f"{type(inner).__name__} has no gradient_checkpointing_enable();"
                                                    " use a transformers model or set gradient_checkpointing=False")
    try:
        enable(**{key: {"use_reentrant": False}})
    except ValueError as e:
        raise ConfigError("gradient_checkpointing", str(e)) from e


def _trainable(model: AdapterModel) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model", "no parameter requires grad; add a trainable adapter first")
    return params


def _param_groups(model: AdapterModel, params: list[tuple[str, nn.Parameter]], lr: float) -> list[dict[str, Any]]:
    """One AdamW group per learning-rate multiplier the methods ask for; the base-rate group comes first."""
    multipliers = model.lr_multipliers()
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for _, p in params:
        groups.setdefault(multipliers.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * m} for m, ps in groups.items() if ps]


def _setup(model: AdapterModel, batches_fn: Callable[[int], list[Batch]], args: TrainArgs) -> _Run:
    if not isinstance(model, AdapterModel):
        raise ConfigError("model", f"expected a peftkit AdapterModel, got {type(model).__name__}")
    _seed(args.seed)
    params = _trainable(model)
    first = batches_fn(0)
    if not first:
        raise DataError("batches_fn(0) returned no batches: the training set is empty")
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    steps_per_epoch = math.ceil(len(first) / args.grad_accum)
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = math.ceil(args.warmup_ratio * total)
    optimizer = torch.optim.AdamW(_param_groups(model, params, args.lr), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, args.schedule))
    return _Run(model, args, batches_fn, params, optimizer, scheduler, total, Path(args.output_dir),
                cache=(0, first))


def _resume(run: _Run, resume_from: str | os.PathLike) -> None:
    path = resolve_checkpoint(resume_from, run.out)
    state = load_checkpoint(path, run.model, run.params, run.optimizer, run.scheduler)
    run.step, run.epoch, run.batch_index = state["step"], state["epoch"], state["batch_index"]
    run.metrics = list(state.get("metrics", []))
    run.last_loss = state.get("last_loss", math.nan)
    run.elapsed_before = state.get("elapsed", 0.0)


# --- one optimizer step -------------------------------------------------------------------------------------
def _tokens(batch: Batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel() if "input_ids" in batch else 0


def _loss(model: AdapterModel, batch: Batch) -> Tensor:
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise DataError("model(**batch) returned no loss; batches need `labels`")
    extra = model.extra_losses()
    if model.has_output_losses():
        extra |= model.output_losses(out["logits"] if isinstance(out, dict) else out.logits,
                                     reference=lambda: _reference_logits(model, batch))
    return loss + sum(extra.values())


def _reference_logits(model: AdapterModel, batch: Batch) -> Tensor:
    with torch.no_grad(), model.disabled():
        out = model(**batch)
    return out["logits"] if isinstance(out, dict) else out.logits


def _optimizer_step(run: _Run, group: list[Batch]) -> None:
    """Forward/backward over the micro-batches of `group`, then one clipped AdamW step."""
    device = run.params[0][1].device
    loss_sum, tokens = 0.0, 0
    for batch in group:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.args.bf16):
            loss = _loss(run.model, batch)
        (loss / len(group)).backward()
        loss_sum += loss.detach().item() / len(group)
        tokens += _tokens(batch)
    if run.args.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in run.params], run.args.max_grad_norm)
    run.model.pre_step_hook(run.step + 1)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    if run.model.step_hook(run.step, run.optimizer):  # gradients are still there for importance scores
        run.params = _trainable(run.model)  # an adapter grew or dropped parameters
    run.optimizer.zero_grad(set_to_none=True)
    run.last_loss = loss_sum
    run.window.add(loss_sum, tokens)


def _advance(run: _Run, taken: int, n_batches: int) -> None:
    run.batch_index += taken
    if run.batch_index >= n_batches:
        run.epoch, run.batch_index = run.epoch + 1, 0


# --- logging, eval, checkpoints -------------------------------------------------------------------------------
def _evaluate(model: AdapterModel, eval_fn: Callable[[AdapterModel], dict[str, Any]]) -> dict[str, Any]:
    """eval_fn(model) in eval mode without grad, as plain JSON values; its RNG use does not leak into training."""
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            results = dict(eval_fn(model))
    finally:
        model.train()
    return json.loads(json.dumps(results, default=_plain))


def _plain(value: Any) -> Any:
    """JSON fallback: tensors and numpy values via .tolist(), anything else as its str."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _record(run: _Run, lr: float, n_batches: int) -> dict[str, Any]:
    w, run.window = run.window, _Window()
    seconds = max(run.window.since - w.since, 1e-9)
    return {"step": run.step, "epoch": round(run.epoch + run.batch_index / n_batches, 4),
            "loss": w.loss / max(w.steps, 1), "lr": lr, "tokens_per_s": w.tokens / seconds,
            "elapsed": round(run.elapsed(), 3)}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _after_step(run: _Run, lr: float, n_batches: int, eval_fn, on_log, bar) -> None:
    """Log every `log_every` steps (and at the end), evaluate every `eval_every`, save every `save_every`."""
    args, step = run.args, run.step
    evaluate = eval_fn is not None and args.eval_every is not None and step % args.eval_every == 0
    if evaluate or step % args.log_every == 0 or step == run.total:
        record = _record(run, lr, n_batches)
        if evaluate:
            record["eval"] = _evaluate(run.model, eval_fn)
        run.metrics.append(record)
        _append_jsonl(run.out / "metrics.jsonl", record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if on_log is not None:
            on_log(record)
    if args.save_every is not None and step % args.save_every == 0:
        root = run.out / "checkpoints"
        save_checkpoint(root / f"step-{step}", run.model, run.params, run.optimizer, run.scheduler, run.progress())
        prune_checkpoints(root, args.keep_checkpoints)
    if run.window.steps == 0:  # eval and save time is not training time
        run.window.since = time.perf_counter()


def _progress_bar(run: _Run):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the `cli` extra; without it, no bar
        return _NoBar()
    return tqdm(total=run.total, initial=run.step, desc="train", unit="step", disable=None, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _loop(run: _Run, eval_fn, on_log) -> None:
    bar = _progress_bar(run)
    try:
        while run.step < run.total:
            batches = run.batches()
            group = batches[run.batch_index:run.batch_index + run.args.grad_accum]
            if not group:
                raise DataError(f"batches_fn({run.epoch}) returned no batches at index {run.batch_index}")
            lr = run.optimizer.param_groups[0]["lr"]
            _optimizer_step(run, group)
            _advance(run, len(group), len(batches))
            _after_step(run, lr, len(batches), eval_fn, on_log, bar)
            bar.update(1)
    finally:
        bar.close()


# --- the entry point ----------------------------------------------------------------------------------------
def _final_eval(run: _Run, eval_fn) -> dict[str, Any]:
    if eval_fn is None:
        return {}
    last = run.metrics[-1] if run.metrics else {}
    if last.get("step") == run.step and "eval" in last:
        return dict(last["eval"])
    return _evaluate(run.model, eval_fn)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _check_output(out: Path) -> None:
    """A fresh run refuses a dir that holds another run's checkpoints (pruning would mix the two)."""
    if list_checkpoints(out / "checkpoints"):
        raise ConfigError("output_dir", f"{out / 'checkpoints'} holds checkpoints of an earlier run; continue it "
                                        "with resume_from='latest' (CLI: --resume), or choose another output_dir "
                                        "(CLI: --train.output_dir DIR)")


def _prepare_output(run: _Run) -> None:
    """Drop checkpoints after the run's step (an abandoned continuation of a resumed run) and rewrite
    metrics.jsonl up to it."""
    for step, path in list_checkpoints(run.out / "checkpoints"):
        if step > run.step:
            shutil.rmtree(path)
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.metrics))


def train(model: AdapterModel, batches_fn: Callable[[int], list[Batch]], args: TrainArgs,
          eval_fn: Callable[[AdapterModel], dict[str, Any]] | None = None,
          resume_from: str | os.PathLike | None = None,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train `model`'s trainable parameters; write adapter/, metrics.jsonl, eval.json, loss.png to output_dir.
    With `gradient_checkpointing`, the wrapped model keeps it enabled afterwards.

    Args:
        batches_fn: epoch -> that epoch's batches (dicts of tensors with `labels`), the same list every call and
            built without the global RNGs, so a resume can skip to (epoch, batch index) exactly.
        eval_fn: model -> {metric: value}, run every `eval_every` steps and at the end.
        resume_from: a `checkpoints/step-<N>` dir or "latest"; the model must be built as in the first run.
            Checkpoints in output_dir after that step are deleted; without it, output_dir must hold none.
        on_log: called with each metrics record (a dict, as written to metrics.jsonl).

    Raises:
        ConfigError: bad args, no trainable parameters, gradient checkpointing unsupported, output_dir holding
            checkpoints of another run.
        DataError: no batches, or batches without labels.
        CheckpointError: a missing, corrupt or mismatched checkpoint.
    """
    if resume_from is None:
        _check_output(Path(args.output_dir))
    run = _setup(model, batches_fn, args)
    if resume_from is not None:
        _resume(run, resume_from)
    _prepare_output(run)
    was_training = model.training
    model.train()
    try:
        _loop(run, eval_fn, on_log)
        results = _final_eval(run, eval_fn)
    finally:
        model.train(was_training)
    save_adapters(model, run.out / "adapter")
    _write_json(run.out / "eval.json", results)
    plot_metrics(run.metrics, run.out / "loss.png")
    return TrainResult(steps=run.step, final_loss=run.last_loss, eval=results, output_dir=run.out)

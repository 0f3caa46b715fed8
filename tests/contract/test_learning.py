"""Every registered method learns: a few dozen steps of the real training loop on a tiny learnable task lower
the held-out loss by a set fraction.

Task: a tiny seeded Llama (frozen, random) continues arithmetic token runs (t, t+1, t+2, ...) mod V. The loss is
measured in eval mode on held-out batches with the task loss only (no regularizers, dropout or perturbations),
before and after `peftkit.train.loop.train` runs STEPS AdamW steps, so each method's training extras
(extra_losses, output_losses, step_hook) run exactly as in `peftkit train`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit import AdapterModel, Calibration, UnsupportedLayerError
from peftkit.train import TrainArgs, train
from train.loop_helpers import TARGETS, batches_fn, tiny_base  # tests/ is on sys.path (rootdir import)

from .conftest import TINY_FIELDS, make_config

STEPS = 40
LR = 1e-2
MIN_DROP = 0.05  # the held-out loss must fall by at least this fraction (LoRA: 43%; 4-parameter-per-layer SVFit: ~10%)


def _eval_loss(model: AdapterModel, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(float(model(**b).loss) for b in batches) / len(batches)
    model.train()
    return loss


def test_method_learns(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AdapterModel(tiny_base())
    train_batches = lambda epoch: batches_fn(epoch, seed=1, pattern=True)  # noqa: E731
    held_out = batches_fn(0, seed=2, pattern=True)
    try:
        model.add_adapter("default", make_config(method, TARGETS, **TINY_FIELDS),
                          calibration=Calibration(train_batches(0)[:2]))
    except UnsupportedLayerError as e:
        pytest.skip(f"{method} cannot adapt the tiny Llama's projections: {e}")
    before = _eval_loss(model, held_out)
    args = TrainArgs(output_dir=str(tmp_path), max_steps=STEPS, lr=LR, warmup_ratio=0.0, schedule="constant",
                     keep_checkpoints=None, log_every=STEPS)
    train(model, train_batches, args)
    after = _eval_loss(model, held_out)
    assert after <= (1 - MIN_DROP) * before, f"{method}: held-out loss {before:.3f} -> {after:.3f}"

"""Every method resumes exactly: N steps, a crash right after the checkpoint, a fresh model resumed from it and
N more steps give the same model (adapter tensors, buffers and base weights) as 2N straight steps.

A fresh model is built as in the first run. When a method changed its shapes during training (rank pruning or
growth), the checkpoint says so and the fresh model loads the checkpoint's adapter instead, as the error advises.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit import AdapterModel, Calibration, CheckpointError, UnsupportedLayerError, load_adapter
from peftkit.train import TrainArgs, loop, train
from train.loop_helpers import TARGETS, batches_fn, tiny_base  # tests/ is on sys.path (rootdir import)

from .conftest import TINY_FIELDS, make_config

N = 3


class Crash(Exception):
    pass


def _model(method: str) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(tiny_base())
    config = make_config(method, TARGETS, **{**TINY_FIELDS, "total_step": 2 * N})
    model.add_adapter("default", config, calibration=Calibration(_batches(0)[:2]))
    return model


def _batches(epoch: int):
    return batches_fn(epoch, seed=1, pattern=True)


def _args(out: Path) -> TrainArgs:
    return TrainArgs(output_dir=str(out), max_steps=2 * N, save_every=N, lr=5e-3, seed=3, warmup_ratio=0.0,
                     log_every=2 * N, keep_checkpoints=None)


def _state(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_equals_straight_run(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        straight = _model(method)
    except UnsupportedLayerError as e:
        pytest.skip(f"{method} cannot adapt the tiny Llama's projections: {e}")
    train(straight, _batches, _args(tmp_path / "a"))
    real = loop.save_checkpoint

    def save_then_crash(directory, *a, **kw):
        real(directory, *a, **kw)
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            train(_model(method), _batches, _args(tmp_path / "b"))
    checkpoint = tmp_path / "b" / "checkpoints" / f"step-{N}"
    resumed = _model(method)
    try:
        train(resumed, _batches, _args(tmp_path / "b"), resume_from="latest")
    except CheckpointError as e:
        assert "load_adapter" in str(e), e  # shapes changed in training: build from the checkpoint's adapter
        resumed = AdapterModel(tiny_base())
        load_adapter(resumed, checkpoint / "adapter", "default", trainable=True)
        train(resumed, _batches, _args(tmp_path / "b"), resume_from="latest")
    want, got = _state(straight), _state(resumed)
    assert want.keys() == got.keys()
    # A method that folds updates into the base weight (init_delta) gets it back in one sum on resume rather than
    # step by step: equal up to float rounding, which then reaches everything trained after. Others: bit for bit.
    atol = 1e-6 if any(a.init_delta is not None for a in _adapters(straight)) else 0.0
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def _adapters(model: AdapterModel):
    return [h.adapters["default"] for _, h in model.hosts() if "default" in getattr(h, "adapters", {})]

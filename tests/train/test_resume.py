"""Checkpoints: N steps + crash + resume in a fresh model + N steps == 2N straight, bit for bit; atomic saves,
pruning, and clear errors for missing or corrupt checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit import CheckpointError, ConfigError, CorruptCheckpointError
from peftkit.train import checkpoints, loop
from peftkit.train.loop import TrainArgs, train

from .loop_helpers import adapter_tensors, batches_fn, one_thread, read_checkpoint, read_metrics, tiny_model  # noqa: F401

N = 4  # steps before the crash; the runs go to 2N (5 batches an epoch, so they cross an epoch boundary)


class Crash(Exception):
    pass


def _crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Kill the run right after the checkpoint of `at_step` is written (as a SIGKILL would, nothing after)."""
    real = loop.save_checkpoint

    def save_then_crash(directory, *a, **kw):
        path = real(directory, *a, **kw)
        if Path(directory).name == f"step-{at_step}":
            raise Crash
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)


CASES = {
    "plain": dict(dropout=0.0, grad_accum=1, schedule="linear", warmup_ratio=0.0),
    "dropout": dict(dropout=0.1, grad_accum=1, schedule="cosine", warmup_ratio=0.0),
    "grad_accum": dict(dropout=0.0, grad_accum=2, schedule="cosine", warmup_ratio=0.03),
    "cosine_mid_warmup": dict(dropout=0.1, grad_accum=1, schedule="cosine", warmup_ratio=0.75),  # 6 warmup steps
}


@pytest.mark.parametrize("case", CASES)
def test_resume_equals_straight_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    c = CASES[case]
    args = dict(lr=5e-3, max_steps=2 * N, save_every=N, grad_accum=c["grad_accum"], schedule=c["schedule"],
                warmup_ratio=c["warmup_ratio"], seed=3)
    straight = tiny_model(c["dropout"])
    train(straight, batches_fn, TrainArgs(output_dir=str(tmp_path / "a"), **args))

    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, N)
        with pytest.raises(Crash):
            train(tiny_model(c["dropout"]), batches_fn, TrainArgs(output_dir=str(tmp_path / "b"), **args))
    fresh = tiny_model(c["dropout"], adapter_seed=123)  # a new process: other adapter init, other RNG state
    torch.manual_seed(999)
    result = train(fresh, batches_fn, TrainArgs(output_dir=str(tmp_path / "b"), **args), resume_from="latest")

    assert result.steps == 2 * N
    want, got = adapter_tensors(straight), adapter_tensors(fresh)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed adapter differs from the straight run"
    _, opt_a, state_a = read_checkpoint(tmp_path / "a" / "checkpoints" / f"step-{2 * N}")
    _, opt_b, state_b = read_checkpoint(tmp_path / "b" / "checkpoints" / f"step-{2 * N}")
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    for key in ("optimizer", "scheduler", "rng", "epoch", "batch_index"):
        assert state_a[key] == state_b[key], key
    losses = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(tmp_path / "a")]
    assert [(r["step"], r["loss"], r["lr"]) for r in read_metrics(tmp_path / "b")] == losses


def test_checkpoint_records_position_and_plain_json(tmp_path: Path) -> None:
    model = tiny_model()
    train(model, batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=4, save_every=2, grad_accum=2,
                                       keep_checkpoints=None))
    # 5 batches an epoch in groups of 2: steps take [0,1] [2,3] [4] | [0,1] ...
    positions = {}
    for step in (2, 4):
        params, opt, state = read_checkpoint(tmp_path / "checkpoints" / f"step-{step}")
        positions[step] = (state["step"], state["epoch"], state["batch_index"])
        assert set(params) == set(state["param_names"]) == set(adapter_tensors(model))
        assert {k.split(".")[0] for k in opt} == {"state"}
        assert (tmp_path / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors").is_file()
    assert positions == {2: (2, 0, 4), 4: (4, 1, 2)}
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))


def test_keep_checkpoints_prunes_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    stale = tmp_path / "checkpoints" / ".step-9.tmp-1"
    stale.mkdir(parents=True)
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=5, save_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_crash_while_saving_leaves_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoints._write

    def failing_write(path: Path, data: bytes) -> None:
        if path.name == checkpoints.OPTIMIZER and ".step-2." in str(path):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(checkpoints, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=3, save_every=1))
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert checkpoints.resolve_checkpoint("latest", tmp_path).name == "step-1"


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    args = TrainArgs(output_dir=str(tmp_path), max_steps=2, save_every=2)
    train(tiny_model(), batches_fn, args)
    result = train(tiny_model(), batches_fn, args, resume_from=tmp_path / "checkpoints" / "step-2")
    assert result.steps == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    assert len(read_metrics(tmp_path)) == 2


# --- errors -------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=2, save_every=2))
    return tmp_path / "checkpoints" / "step-2"


def _resume(path) -> None:
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(Path(path).parent.parent), max_steps=3),
          resume_from=path)


def test_latest_without_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no step-<N> checkpoint"):
        train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=1), resume_from="latest")


@pytest.mark.parametrize("victim", ["trainer_state.json", "optimizer.safetensors", "params.safetensors", "adapter"])
def test_missing_file(saved: Path, victim: str) -> None:
    target = saved / victim
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        _resume(saved)


@pytest.mark.parametrize("victim", ["optimizer.safetensors", "params.safetensors", "adapter/adapter_model.safetensors"])
def test_truncated_tensors(saved: Path, victim: str) -> None:
    data = (saved / victim).read_bytes()
    (saved / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="corrupt or truncated"):
        _resume(saved)


def test_bad_trainer_state(saved: Path) -> None:
    (saved / "trainer_state.json").write_text('{"format": 1, "step": ')
    with pytest.raises(CorruptCheckpointError, match="invalid JSON"):
        _resume(saved)
    (saved / "trainer_state.json").write_text(json.dumps({"format": 1, "step": 2}))
    with pytest.raises(CorruptCheckpointError, match="missing"):
        _resume(saved)


def test_checkpoint_of_another_model(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="shape"):
        train(tiny_model(r=8), batches_fn, TrainArgs(output_dir=str(saved.parent.parent), max_steps=3),
              resume_from=saved)


def test_failed_resume_leaves_model_untouched(saved: Path) -> None:
    (saved / "optimizer.safetensors").write_bytes(b"\x00" * 16)
    model = tiny_model(adapter_seed=7)
    before = adapter_tensors(model)
    with pytest.raises(CorruptCheckpointError):
        train(model, batches_fn, TrainArgs(output_dir=str(saved.parent.parent), max_steps=3), resume_from=saved)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(model).items())


def test_fresh_run_refuses_a_dir_with_checkpoints(saved: Path) -> None:
    model = tiny_model(adapter_seed=5)
    before = adapter_tensors(model)
    with pytest.raises(ConfigError, match="resume_from='latest'") as info:
        train(model, batches_fn, TrainArgs(output_dir=str(saved.parent.parent), max_steps=1))
    assert info.value.field == "output_dir"
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(model).items())


def test_resume_from_an_earlier_step_drops_the_abandoned_continuation(tmp_path: Path) -> None:
    args = TrainArgs(output_dir=str(tmp_path), max_steps=4, save_every=1, keep_checkpoints=None)
    train(tiny_model(), batches_fn, args)
    train(tiny_model(), batches_fn, TrainArgs(output_dir=str(tmp_path), max_steps=3, save_every=1,
                                              keep_checkpoints=None), resume_from=tmp_path / "checkpoints" / "step-2")
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]

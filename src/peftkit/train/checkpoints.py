"""Training checkpoints: everything a resumed run needs to continue bit-for-bit, written atomically, no pickle.

Layout of `output_dir/checkpoints/step-<N>/`:
  adapter/                  every trainable adapter in the PEFT format ("default" here, others in adapter/<name>/)
  params.safetensors        every trainable tensor under its in-memory parameter name (the exact restore source)
  optimizer.safetensors     optimizer state tensors, keys `state.<param index>.<name>` (torch's state_dict order)
  trainer_state.json        param groups, scheduler state, step, data position, RNG states, metrics so far

A checkpoint is written into a hidden temp dir beside its final name and renamed into place, so a crash never
leaves a half-written `step-<N>`. The adapter dir is written for people and tools (pick any step's adapter);
the resume reads `params.safetensors`, which needs no key translation.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..checkpoint import adapter_state, read_adapter, restore_adapter_state, save_adapter
from ..core.model import AdapterModel
from ..errors import CheckpointError, CorruptCheckpointError, ShapeMismatchError

__all__ = ["FORMAT_VERSION", "list_checkpoints", "load_checkpoint", "prune_checkpoints", "resolve_checkpoint",
           "rng_state", "save_adapters", "save_checkpoint", "set_rng_state"]

FORMAT_VERSION = 1
PARAMS, OPTIMIZER, STATE = "params.safetensors", "optimizer.safetensors", "trainer_state.json"
ADAPTER_STATE = "adapter_train_state.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")
_REQUIRED = ("param_names", "optimizer", "scheduler", "rng", "step", "epoch", "batch_index")


# --- adapters -----------------------------------------------------------------------------------------------
def _adapter_dir(root: Path, name: str) -> Path:
    return root if name == "default" else root / name


def save_adapters(model: AdapterModel, directory: str | os.PathLike) -> Path:
    """Write every trainable adapter in the PEFT format: "default" in `directory`, others in `directory/<name>`."""
    directory = Path(directory)
    for name in model.trainable:
        save_adapter(model, _adapter_dir(directory, name), name)
    return directory


def _adapter_train_states(model: AdapterModel) -> dict[str, Tensor]:
    """{"<adapter>|<layer path>|<key>": tensor} of every trainable adapter's `train_state()`."""
    out = {}
    for path, host in model.hosts():
        for name in model.trainable:
            adapters = getattr(host, "adapters", {})  # module copies (ModulesToSave) hold no adapter
            for key, t in (adapters[name].train_state() if name in adapters else {}).items():
                out[f"{name}|{path}|{key}"] = t.detach().to("cpu").contiguous()
    return out


def _load_adapter_train_states(where: Path, model: AdapterModel, saved: dict[str, Tensor]) -> None:
    live = _adapter_train_states(model)
    if set(saved) != set(live):
        diff = sorted(set(saved) ^ set(live))
        raise CorruptCheckpointError(f"{where}: adapter training state differs from the model's ({diff[:3]}); build "
                                     "the model and adapters exactly as in the interrupted run")
    for key, t in saved.items():
        if t.shape != live[key].shape:
            raise ShapeMismatchError(f"{where}: {key} has shape {tuple(t.shape)}, the model has "
                                     f"{tuple(live[key].shape)}")
    by_layer: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in saved.items():
        name, path, field = key.split("|")
        by_layer.setdefault((name, path), {})[field] = t
    for (name, path), state in by_layer.items():
        model.model.get_submodule(path).adapters[name].load_train_state(state)


# --- RNG ----------------------------------------------------------------------------------------------------
def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with every torch wheel we test on
        return None
    return numpy


def rng_state() -> dict[str, Any]:
    """The torch (CPU, CUDA), python and numpy RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": bytes(torch.get_rng_state().tolist()).hex(),
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(s.tolist()).hex() for s in torch.cuda.get_rng_state_all()]
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), pos, has_gauss, cached]
    return state


def _byte_tensor(text: str) -> Tensor:
    return torch.tensor(list(bytes.fromhex(text)), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(_byte_tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])
    np = _numpy()
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- optimizer and scheduler <-> tensors + JSON ---------------------------------------------------------------
def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """({"state.<i>.<name>": tensor}, {"param_groups": [...], "state_values": {i: {name: non-tensor}}})."""
    sd = optimizer.state_dict()
    tensors, values = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                values.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state_values": values}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], saved: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in saved["state_values"].items():
        state.setdefault(int(index), {}).update(entry)
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(saved["param_groups"]):
        raise CheckpointError(f"the checkpoint has {len(saved['param_groups'])} optimizer param groups, this run "
                              f"has {len(current)}")
    groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in g.items()}  # JSON lists -> tuples
              for g, now in zip(saved["param_groups"], current, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # the lambda is rebuilt, not saved


def _load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict[str, Any]) -> None:
    current = scheduler.state_dict()
    scheduler.load_state_dict({**saved, **({"lr_lambdas": current["lr_lambdas"]} if "lr_lambdas" in current else {})})


# --- writing ------------------------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: str | os.PathLike, model: AdapterModel, params: list[tuple[str, nn.Parameter]],
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    progress: dict[str, Any]) -> Path:
    """Atomically write a checkpoint to `directory` (replacing one already there).

    params: the optimizer's (name, parameter) list, in optimizer order. progress: JSON-able loop state (step,
    epoch, batch_index, metrics, ...), stored as is in trainer_state.json next to the optimizer/scheduler/RNG.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapters(model, tmp / "adapter")
    _write(tmp / PARAMS, st_save({n: p.detach().to("cpu").contiguous() for n, p in params}))
    _write(tmp / ADAPTER_STATE, st_save(_adapter_train_states(model)))
    tensors, optim_json = _optimizer_parts(optimizer)
    _write(tmp / OPTIMIZER, st_save(tensors))
    state = {"format": FORMAT_VERSION, "param_names": [n for n, _ in params], "optimizer": optim_json,
             "scheduler": _scheduler_state(scheduler), "rng": rng_state(), **progress}
    _write(tmp / STATE, json.dumps(state, indent=1).encode())
    if final.exists():  # re-saving a step (after a resume): move the old one aside, then swap
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (`step-<N>` dirs; temp dirs are hidden), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name)))


def prune_checkpoints(root: str | os.PathLike, keep: int | None) -> None:
    """Keep the newest `keep` checkpoints (None: all) and drop leftover temp dirs of interrupted saves."""
    root = Path(root)
    stale = [p for p in root.glob(".step-*") if p.is_dir()]
    old = [p for _, p in list_checkpoints(root)][:-keep] if keep else []
    for path in stale + old:
        shutil.rmtree(path)


# --- reading ------------------------------------------------------------------------------------------------
def resolve_checkpoint(resume_from: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """A checkpoint dir, or "latest": the newest one in `output_dir/checkpoints`."""
    if str(resume_from) != "latest":
        return Path(resume_from)
    found = list_checkpoints(Path(output_dir) / "checkpoints")
    if not found:
        raise CheckpointError(f"resume_from='latest': no step-<N> checkpoint in {Path(output_dir) / 'checkpoints'}")
    return found[-1][1]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: invalid JSON ({e}); the checkpoint is corrupt or truncated") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{path}: not a peftkit trainer state (format {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CorruptCheckpointError(f"{path}: missing {missing}; the checkpoint is corrupt")
    return data


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({e}); the checkpoint is corrupt "
                                     "or truncated, resume from an earlier one") from e


def _check_params(where: Path, state: dict[str, Any], saved: dict[str, Tensor],
                  params: list[tuple[str, nn.Parameter]]) -> None:
    names = [n for n, _ in params]
    hint = ("build the model and adapters exactly as in the interrupted run; if a method changed its ranks in "
            "training (pruning, growth), load the checkpoint's adapter instead: load_adapter(model, "
            f"'{where / 'adapter'}', trainable=True)")
    if state["param_names"] != names or set(saved) != set(names):
        diff = sorted(set(state["param_names"]) ^ set(names))
        raise CheckpointError(f"{where}: the checkpoint was written for other trainable parameters (differing: "
                              f"{diff[:3]}); {hint}")
    for name, p in params:
        if saved[name].shape != p.shape:
            raise ShapeMismatchError(f"{where}: {name} has shape {tuple(saved[name].shape)}, the model has "
                                     f"{tuple(p.shape)}; {hint}")


def _check_adapters(where: Path, model: AdapterModel) -> dict[str, dict[str, Tensor]]:
    """The PEFT adapter dirs must be readable; returns the tensors of those holding exactly the live adapters'
    keys and shapes (buffers and base shifts are restored from them). A saved adapter may legitimately differ:
    methods that mask ranks in training save only the kept ones; their state is in params and train state."""
    out = {}
    for name in model.trainable:
        _, tensors = read_adapter(_adapter_dir(where / "adapter", name))
        live = adapter_state(model, name)
        if {k: t.shape for k, t in tensors.items()} == {k: t.shape for k, t in live.items()}:
            out[name] = tensors
    return out


def load_checkpoint(directory: str | os.PathLike, model: AdapterModel, params: list[tuple[str, nn.Parameter]],
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore trainable tensors, optimizer, scheduler and RNG from `directory`; returns the trainer state
    (step, epoch, batch_index, metrics, ...). Files, names and shapes are checked before anything changes."""
    where = Path(directory)
    missing = [f for f in (STATE, PARAMS, OPTIMIZER, "adapter") if not (where / f).exists()]
    if not where.is_dir() or missing:
        raise CheckpointError(f"{where}: not a training checkpoint (missing {missing or 'the directory'}); "
                              "pass a checkpoints/step-<N> dir or 'latest'")
    state = _read_json(where / STATE)
    saved, optim_tensors = _read_tensors(where / PARAMS), _read_tensors(where / OPTIMIZER)
    _check_params(where, state, saved, params)
    adapters = _check_adapters(where, model)
    try:
        _load_optimizer(optimizer, optim_tensors, state["optimizer"])
        _load_scheduler(scheduler, state["scheduler"])
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: optimizer or scheduler state does not fit this run ({e})") from e
    adapter_states = _read_tensors(where / ADAPTER_STATE) if (where / ADAPTER_STATE).exists() else {}
    with torch.no_grad():
        for name, p in params:
            p.copy_(saved[name])
        _load_adapter_train_states(where, model, adapter_states)
    for name, tensors in adapters.items():  # buffers (masks, folded updates) and the base shifts they imply
        restore_adapter_state(model, name, tensors)
    set_rng_state(state["rng"])
    return state

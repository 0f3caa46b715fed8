"""Adapter tensors <-> adapter_model.safetensors, with peft's key names; validated reads, atomic writes.

Disk key = "base_model.model." + module path + "." + the adapter's `disk_names()` suffix, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Module copies (modules_to_save) are stored
as `base_model.model.<path>.<param>`, trained biases as `base_model.model.<path>[.base_layer].bias`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor

from .. import __version__
from ..core.adapter import Adapter
from ..core.config import AdapterConfig
from ..core.host import AdaptedLayer, ModulesToSave
from ..core.inject import Plan
from ..core.model import AdapterModel
from ..errors import CheckpointError, CorruptCheckpointError, NonFiniteWeightError, ShapeMismatchError
from .config_json import config_from_json, config_to_json

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "adapter_state", "save_adapter", "read_adapter", "load_adapter",
           "restore_adapter_state"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


# --- writing ------------------------------------------------------------------------------------------------
def _adapter_tensors(adapter, original_base: bool) -> dict[str, Tensor]:
    converted = (adapter.state_for_original_base() if original_base else None) or {}
    out = {suffix: converted.get(name, getattr(adapter, name)) for name, suffix in adapter.disk_names().items()}
    return out if converted else out | adapter.optional_state()


def _shared_keys(adapters) -> dict[str, tuple[object, str]]:
    """{disk key: (adapter, attribute)} of tensors shared across layers ("base_model.<suffix>", or a root key used
    verbatim), once each."""
    out = {}
    for adapter in adapters:
        for attr, suffix in adapter.shared_disk_names().items():
            out.setdefault(f"base_model.{suffix}", (adapter, attr))
        for attr, key in adapter.root_disk_names().items():
            out.setdefault(key, (adapter, attr))
    return out


def _copy_state(host: ModulesToSave, name: str, path: str, bias_all: bool) -> dict[str, Tensor]:
    """A module copy's tensors; with bias="all" peft also writes both biases under the wrapper's names."""
    out = {f"{PREFIX}{path}.{key}": t for key, t in host.copies[name].state_dict().items()}
    if bias_all:
        for key, t in host.original_module.state_dict().items():
            if key.endswith("bias"):
                out[f"{PREFIX}{path}.original_module.{key}"] = t
                out[f"{PREFIX}{path}.modules_to_save.{key}"] = host.copies[name].state_dict()[key].clone()
    return out


def adapter_state(model: AdapterModel, name: str, original_base: bool = False) -> dict[str, Tensor]:
    """{disk key: tensor} for adapter `name` (contiguous CPU copies)."""
    out: dict[str, Tensor] = {}
    for path, host in model.hosts():
        if isinstance(host, AdaptedLayer) and name in host.adapters:
            for suffix, t in _adapter_tensors(host.adapters[name], original_base).items():
                out[f"{PREFIX}{path}.{suffix}"] = t
        elif isinstance(host, ModulesToSave) and name in host.copies:
            out.update(_copy_state(host, name, path, model.configs[name].bias == "all"))
    layers = {p: h.adapters[name] for p, h in model.hosts() if isinstance(h, AdaptedLayer) and name in h.adapters}
    out.update({key: getattr(a, attr) for key, (a, attr) in _shared_keys(layers.values()).items()})
    for key in model.bias_names(model.configs[name], layers):
        out[PREFIX + key] = model.model.get_parameter(key)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model: AdapterModel, directory: str | os.PathLike, name: str = "default",
                 original_base: bool = False, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` to `directory` in the PEFT format. original_base=True converts adapters whose init
    changed the base weight (PiSSA, OLoRA, ...) into plain adapters for the untouched base."""
    model._check_names([name])
    config = model.current_config(name)
    tensors = adapter_state(model, name, original_base)
    if original_base and _converted(model, name):
        config = config.for_original_base()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "producer": f"peftkit {__version__}"}
    _atomic_write(directory / WEIGHTS_NAME, st_save(tensors, metadata=meta))
    text = json.dumps(config_to_json(config, base_model_name_or_path), indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_NAME, text.encode())
    return directory


def _converted(model: AdapterModel, name: str) -> bool:
    """Whether any layer of adapter `name` has a different form against the original base (a base-mutating init)."""
    return any(h.adapters[name].state_for_original_base() is not None for _, h in model.hosts()
               if isinstance(h, AdaptedLayer) and name in h.adapters)


# --- reading ------------------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """Read and check an adapter directory: JSON, safetensors integrity, float dtypes, finite values."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this an adapter directory?")
    if not weights_path.is_file():
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (f" Found {pickles}: pickle files are never loaded; convert them to safetensors with "
                "`safetensors.torch.save_file` in a trusted environment.") if pickles else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}.{hint}")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{cfg_path}: invalid JSON ({e}); the file is corrupt or truncated") from e
    config = config_from_json(data, str(cfg_path))
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{weights_path}: not a readable safetensors file ({e}); it is corrupt or "
                                     "truncated, save the adapter again") from e
    for key, t in tensors.items():
        if t.is_complex():
            raise CorruptCheckpointError(f"{weights_path}: {key} has dtype {t.dtype}; adapters hold real tensors")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteWeightError(f"{weights_path}: {key} contains NaN or Inf; the adapter is unusable")
    return config, tensors


def _expected(model: AdapterModel, p: Plan) -> dict[str, tuple[int, ...]]:
    """{disk key: shape} the planned adapter needs."""
    out = {}
    for path, adapter in p.adapters.items():
        for pname, suffix in adapter.disk_names().items():
            out[f"{PREFIX}{path}.{suffix}"] = tuple(getattr(adapter, pname).shape)
    out.update({key: tuple(getattr(a, attr).shape) for key, (a, attr) in _shared_keys(p.adapters.values()).items()})
    for path in p.saved_modules:
        out.update({f"{PREFIX}{path}.{k}": tuple(v.shape) for k, v in _original(model, path).state_dict().items()})
    for key in model.bias_names(p.config, p.adapters, p.saved_modules):
        out[PREFIX + key] = tuple(_param_shape(model, key))
    return out


def _param_shape(model: AdapterModel, key: str) -> torch.Size:
    try:
        return model.model.get_parameter(key).shape
    except AttributeError:  # a planned host: the bias still sits on the plain module
        return model.model.get_parameter(key.replace(".base_layer.bias", ".bias")).shape


def _base_weights(p: Plan) -> dict[str, tuple[int, ...]]:
    """Full base weights of adapted layers, which peft saves for embeddings (`save_embedding_layers`)."""
    return {f"{PREFIX}{path}.base_layer.weight": tuple(a.ops.weight.shape) for path, a in p.adapters.items()}


def _optional(model: AdapterModel, p: Plan) -> dict[str, tuple[int, ...]]:
    """Keys accepted when present: base weights (loaded), and the biases of a module copy and its original that
    peft writes with bias="all" as `<path>.modules_to_save.bias` / `<path>.original_module.bias` (ignored)."""
    out = _base_weights(p)
    for path, adapter in p.adapters.items():
        out.update({f"{PREFIX}{path}.{suffix}": shape for suffix, shape in adapter.optional_disk_names().items()})
    for path in p.saved_modules:
        for key, t in _original(model, path).state_dict().items():
            if key.endswith("bias"):
                out[f"{PREFIX}{path}.original_module.{key}"] = tuple(t.shape)
                out[f"{PREFIX}{path}.modules_to_save.{key}"] = tuple(t.shape)
    return out


def _original(model: AdapterModel, path: str):
    module = model.model.get_submodule(path)
    return module.original_module if isinstance(module, ModulesToSave) else module


def _validate(expected: dict[str, tuple[int, ...]], optional: dict[str, tuple[int, ...]],
              tensors: dict[str, Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    expected = expected | {k: v for k, v in optional.items() if k in tensors}
    if missing:
        raise CorruptCheckpointError(f"{where}: missing {len(missing)} key(s), e.g. {missing[:3]}; the file does "
                                     "not match this model and adapter config")
    if unexpected:
        raise CorruptCheckpointError(f"{where}: {len(unexpected)} key(s) match no adapted module, e.g. "
                                     f"{unexpected[:3]}; check target_modules or the base model")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ShapeMismatchError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                                     f"{shape}; the adapter was trained on a different base model or rank")


def _check_kinds(p: Plan, tensors: dict[str, Tensor], where: str) -> None:
    """A float tensor where the adapter holds floats, an integer one where it holds indices."""
    for path, adapter in p.adapters.items():
        for pname, suffix in adapter.disk_names().items():
            key, target = f"{PREFIX}{path}.{suffix}", getattr(adapter, pname)
            if tensors[key].is_floating_point() != target.is_floating_point():
                raise CorruptCheckpointError(f"{where}: {key} has dtype {tensors[key].dtype}, the adapter holds "
                                             f"{target.dtype}; the file is corrupt or from another method")


def load_adapter(model: AdapterModel, directory: str | os.PathLike, name: str = "default",
                 trainable: bool = False, active: bool | None = None) -> AdapterConfig:
    """Load an adapter directory into `model` as `name`. Everything is checked before the model changes."""
    config, tensors = read_adapter(directory)
    p = model.plan_adapter(name, config, initialize=False)
    where = str(Path(directory) / WEIGHTS_NAME)
    _validate(_expected(model, p), _optional(model, p), tensors, where)
    _check_kinds(p, tensors, where)
    _copy_in(p.adapters, tensors)
    for path, adapter in p.adapters.items():
        optional = _optional_tensors(path, adapter, tensors)
        if optional:
            adapter.load_optional(optional)
        adapter.after_load()
    model.commit_adapter(p, active=active, trainable=trainable)
    _load_extras(model, p, tensors)
    return config


def restore_adapter_state(model: AdapterModel, name: str, tensors: dict[str, Tensor]) -> None:
    """Copy a saved adapter's tensors (already checked to match the live adapter's keys and shapes) into live
    adapter `name`, buffers included, and move the base weight by any change of its `init_delta` (a resumed run
    whose method folded updates into the base or holds masks outside the trained parameters)."""
    layers = {p: h for p, h in model.hosts() if isinstance(h, AdaptedLayer) and name in h.adapters}
    _copy_in({path: host.adapters[name] for path, host in layers.items()}, tensors)
    for path, host in layers.items():
        _reload_shift(host, host.adapters[name], _optional_tensors(path, host.adapters[name], tensors))


def _copy_in(adapters: dict[str, Adapter], tensors: dict[str, Tensor]) -> None:
    """Copy a checked file's per-layer and shared tensors into `adapters` ({module path: adapter})."""
    with torch.no_grad():
        for path, adapter in adapters.items():
            for pname, suffix in adapter.disk_names().items():
                getattr(adapter, pname).copy_(tensors[f"{PREFIX}{path}.{suffix}"])
        for key, (adapter, attr) in _shared_keys(adapters.values()).items():
            getattr(adapter, attr).copy_(tensors[key])


def _optional_tensors(path: str, adapter: Adapter, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter's optional tensors (suffix -> tensor) that the file has."""
    keys = {s: f"{PREFIX}{path}.{s}" for s in adapter.optional_disk_names()}
    return {s: tensors[key] for s, key in keys.items() if key in tensors}


def _reload_shift(host: AdaptedLayer, adapter: Adapter, optional: dict[str, Tensor]) -> None:
    """Run the load hooks as for an adapter joining the model (they see the original base), then make the base
    hold W - init_delta again; bit for bit the old base when init_delta did not change."""
    before = adapter.init_delta
    kept = host.ops.weight2d().detach().clone() if before is not None else None
    if before is not None:
        host.ops.add_weight2d(before)  # the original base W
    if optional:
        adapter.load_optional(optional)
    adapter.after_load()
    after = adapter.init_delta
    if before is not None and after is not None and torch.equal(before, after):
        host.ops.set_weight2d(kept)
    elif after is not None:
        host.ops.add_weight2d(-after)


def _load_extras(model: AdapterModel, p: Plan, tensors: dict[str, Tensor]) -> None:
    for key in _base_weights(p):
        if key in tensors:
            with torch.no_grad():
                model.model.get_parameter(key[len(PREFIX):]).copy_(tensors[key])
    for path in p.saved_modules:
        host = model.model.get_submodule(path)
        keys = host.original_module.state_dict().keys()
        host.copies[p.name].load_state_dict({k: tensors[f"{PREFIX}{path}.{k}"] for k in keys})
    with torch.no_grad():
        for key in model.bias_names(p.config, p.adapters):
            model.model.get_parameter(key).copy_(tensors[PREFIX + key])

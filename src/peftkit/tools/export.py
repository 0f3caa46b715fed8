"""Export an adapter as the plain low-rank adapter vLLM's LoRA loader accepts, or refuse with the reason.

vLLM reads `adapter_config.json` (r, lora_alpha, use_rslora, target_modules) and the factor tensors of
`adapter_model.safetensors`, and applies ONE scale per adapter, `lora_alpha / r`. It ignores rank_pattern /
alpha_pattern and cannot run DoRA magnitudes, module copies, trained biases or bias on B. So the export:

  - keeps the tensors as they are when every module has the same rank and scale (lora_alpha := s * r);
  - otherwise folds each module's scale into its B (B' = s_m B) and zero-pads A and B to r_max, writing
    r = lora_alpha = r_max (scale 1). Padding leaves s B A unchanged: the extra rows of A / columns of B are 0.
  - refuses (`ExportError`, naming the config field) whenever the output would behave differently.

Nothing here names a method: the adapter is read through the generic `read_adapter`, per-module settings
through `config.for_module(path)`, and the tensors by the PEFT key suffixes below (format knowledge).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, config_to_json, read_adapter
from ..checkpoint.peft_format import PREFIX
from ..core.config import AdapterConfig
from ..core.registry import get_method
from ..errors import ExportError
from .merge import staged_dir

__all__ = ["ExportReport", "export_vllm", "FACTOR_SUFFIXES", "split_key"]

# PEFT key suffixes of the two low-rank factors (A: (r, in...), B: (out, r...)). Format knowledge owned by
# checkpoint/; defined here until checkpoint/ exports them (see docs/tools.md).
FACTOR_SUFFIXES = ("lora_A.weight", "lora_B.weight")
EMBEDDING_FACTOR_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")

# Other per-module tensors a PEFT adapter may hold: (key suffix, config field, why vLLM cannot take it).
_REFUSED_SUFFIXES = (
    ("lora_magnitude_vector", "use_dora", "a weight-decomposed (magnitude) adapter; vLLM rejects DoRA, merge it "
                                          "into the base with `peftkit merge` instead"),
    ("lora_B.bias", "lora_bias", "B carries a trained bias, which vLLM's loader does not apply"),
    ("lora_embedding_A", "target_modules", "an embedding-layer adapter; vLLM's support for these is version "
                                           "dependent and not verified, so it is not exported"),
    ("lora_embedding_B", "target_modules", "an embedding-layer adapter (see lora_embedding_A)"),
    ("base_layer.weight", "target_modules", "a full copy of a base weight (peft save_embedding_layers)"),
    ("bias", "bias", "a trained bias of the base model, which a low-rank adapter cannot carry"),
)
# init_lora_weights values whose adapters only make sense on the base weights the init modified (PiSSA-style
# inits take s*B@A out of W; LoftQ/CorDA also rewrite W). Method knowledge; see the hook proposal in docs/tools.md.
_BASE_MUTATING_INIT = re.compile(r"(pissa(_niter_\d+)?|olora|nlora|corda|loftq)")
_REQUIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules")


@dataclass(frozen=True)
class ExportReport:
    """What export_vllm wrote. folded: modules whose scale went into B; padded: modules zero-padded to r."""

    out_dir: Path
    r: int
    lora_alpha: float  # an int when integral
    modules: tuple[str, ...]
    folded: tuple[str, ...] = ()
    padded: tuple[str, ...] = ()


def split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """`base_model.model.<path>.<suffix>` -> (path, suffix) for the first matching suffix, else None."""
    for suffix in suffixes:
        if key.startswith(PREFIX) and key.endswith("." + suffix):
            return key[len(PREFIX):-len(suffix) - 1], suffix
    return None


def _check_config(config: AdapterConfig) -> None:
    """Refuse configs vLLM would read differently than peftkit/peft do."""
    fields = {f.name for f in dataclasses.fields(config)}
    missing = [f for f in _REQUIRED_FIELDS if f not in fields]
    if missing:
        raise ExportError(f"{missing[0]}: the {type(config).__name__} has no {missing} field(s); vLLM only loads "
                          "plain low-rank-factor adapters")
    spec = get_method(config.method)
    if "servable" not in spec.adapter_cls.capabilities:
        field = next(iter(spec.config_defaults), "method")  # the flag that selected the method, if one did
        raise ExportError(f"{field}: {config.method!r} adapters have no plain low-rank form (not 'servable'); "
                          "vLLM cannot load them. Merge the adapter into the base instead")
    if config.modules_to_save:
        raise ExportError(f"modules_to_save: {list(config.modules_to_save)} are trained module copies; vLLM "
                          "cannot load them. Merge the adapter into the base instead")
    if config.bias != "none":
        raise ExportError(f"bias: bias={config.bias!r} trains base biases, which vLLM cannot load")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and _BASE_MUTATING_INIT.fullmatch(init):
        raise ExportError(f"init_lora_weights: {init!r} changed the base weights during training; save the "
                          "adapter with save_pretrained(convert_to_original_base=True) first, then export that")


def _modules(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module path: {suffix: tensor}} of the plain factors; any other tensor refuses the export."""
    out: dict[str, dict[str, Tensor]] = {}
    for key in sorted(tensors):
        hit = split_key(key, FACTOR_SUFFIXES)
        if hit is not None:
            out.setdefault(hit[0], {})[hit[1]] = tensors[key]
            continue
        refused = next((r for r in _REFUSED_SUFFIXES if key.endswith("." + r[0])), None)
        if refused is None:
            raise ExportError(f"target_modules: tensor {key!r} is not a low-rank factor; vLLM cannot load it")
        raise ExportError(f"{refused[1]}: {key!r} is {refused[2]}")
    incomplete = [p for p, parts in out.items() if len(parts) != 2]
    if incomplete:
        raise ExportError(f"target_modules: module {incomplete[0]!r} lacks one of the factors {FACTOR_SUFFIXES}")
    if not out:
        raise ExportError("target_modules: the adapter holds no low-rank factors")
    return out


def _scale(config: AdapterConfig, path: str) -> float:
    scale = getattr(config.for_module(path), "scaling", None)
    if scale is None:
        raise ExportError(f"r: {type(config).__name__} defines no per-module `scaling`; cannot fold the scale")
    return float(scale)


def _pad(t: Tensor, dim: int, r: int) -> Tensor:
    """Zero-pad dimension `dim` (the rank axis) of `t` to size r."""
    shape = list(t.shape)
    shape[dim] = r - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _fold(modules: dict[str, dict[str, Tensor]], scales: dict[str, float]) -> tuple[dict[str, Tensor], int, tuple]:
    """B' = s_m B (computed in fp32, stored in B's dtype), A and B zero-padded to r_max."""
    a_key, b_key = FACTOR_SUFFIXES
    r_max = max(parts[a_key].shape[0] for parts in modules.values())
    out, padded = {}, []
    for path, parts in modules.items():
        a, b = parts[a_key], parts[b_key]  # (r_m, in...), (out, r_m...)
        b = (b.float() * scales[path]).to(b.dtype)
        if a.shape[0] < r_max:
            a, b = _pad(a, 0, r_max), _pad(b, 1, r_max)  # (r_max, in...), (out, r_max...)
            padded.append(path)
        out[f"{PREFIX}{path}.{a_key}"], out[f"{PREFIX}{path}.{b_key}"] = a.contiguous(), b.contiguous()
    return out, r_max, tuple(padded)


def _base_name(adapter_dir: Path) -> str | None:
    """base_model_name_or_path of the source adapter (bookkeeping the config object does not keep)."""
    try:
        return json.loads((adapter_dir / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def export_vllm(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> ExportReport:
    """Write the adapter in `adapter_dir` to `out_dir` in the form vLLM loads (see the module docstring).

    Everything is checked before anything is written; on refusal (`ExportError`, message "<field>: <reason>")
    `out_dir` is untouched. Raises FileExistsError if `out_dir` is non-empty and overwrite is False.
    """
    config, tensors = read_adapter(adapter_dir)
    _check_config(config)
    modules = _modules(tensors)
    scales = {path: _scale(config, path) for path in modules}
    ranks = {parts[FACTOR_SUFFIXES[0]].shape[0] for parts in modules.values()}
    if len(ranks) == 1 and len(set(scales.values())) == 1:
        r, scale = ranks.pop(), scales[next(iter(modules))]
        out, alpha, folded, padded = dict(tensors), scale * r, (), ()
    else:
        out, r, padded = _fold(modules, scales)
        alpha, folded = r, tuple(modules)
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)  # 16, not 16.0, in the JSON
    exported = config.replace(r=r, lora_alpha=alpha, use_rslora=False, target_modules=tuple(modules),
                              **_plain_fields(config))
    text = json.dumps(config_to_json(exported, _base_name(Path(adapter_dir))), indent=2, sort_keys=True)
    with staged_dir(out_dir, overwrite) as tmp:
        save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(text)
    return ExportReport(Path(out_dir), r, alpha, tuple(modules), folded, padded)


def _plain_fields(config: AdapterConfig) -> dict[str, object]:
    """Reset the per-module and matching fields the exact `target_modules` list makes redundant."""
    plain = {"rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "init_lora_weights": True,
             "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
    fields = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in plain.items() if k in fields}

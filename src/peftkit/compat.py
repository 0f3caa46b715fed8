"""A thin peft-compatible facade: migrating is one changed import.

    from peftkit import LoraConfig, get_peft_model, PeftModel
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .checkpoint import load_adapter as _load
from .checkpoint import save_adapter as _save
from .core.config import AdapterConfig
from .core.model import AdapterModel
from .errors import CheckpointError

__all__ = ["PeftModel", "get_peft_model"]

# peft's task-specific wrappers add the task head to modules_to_save; so does the facade.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def _with_task_heads(config: AdapterConfig) -> AdapterConfig:
    heads = _TASK_HEADS.get(str(config.task_type))
    current = config.modules_to_save or ()
    if not heads or set(heads) <= set(current):
        return config
    return config.replace(modules_to_save=current + tuple(h for h in heads if h not in current))


class PeftModel(AdapterModel):
    """peft's `PeftModel` API over `AdapterModel`."""

    def __init__(self, model: nn.Module, peft_config: AdapterConfig | None = None, adapter_name: str = "default"):
        super().__init__(model)
        self.forward = _forward_with_base_signature(self)
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)  # e.g. config, generation_config

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, **kwargs) -> list[str]:
        """As peft: a task_type of SEQ_CLS / TOKEN_CLS / QUESTION_ANS also trains and saves the task head."""
        return super().add_adapter(adapter_name, _with_task_heads(peft_config), **kwargs)

    # --- loading and saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs) -> PeftModel:
        peft_model = cls(model)
        peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **kwargs) -> None:
        _load(self, model_id, adapter_name, trainable=is_trainable)

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        safe_serialization: bool = True,
                        path_initial_model_for_weight_conversion: str | None = None,
                        convert_to_original_base: bool = False, **kwargs) -> None:
        """Adapter "default" goes in save_directory, others in save_directory/<name> (as peft does).
        convert_to_original_base (or peft's path_initial_model_for_weight_conversion) writes PiSSA/OLoRA-style
        adapters as plain LoRA that applies to the original base weights."""
        if not safe_serialization:
            raise CheckpointError("safe_serialization=False would write a pickle; peftkit only writes safetensors")
        convert = convert_to_original_base or path_initial_model_for_weight_conversion is not None
        name_or_path = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
        for name in selected_adapters or list(self.configs):
            where = Path(save_directory) if name == "default" else Path(save_directory) / name
            _save(self, where, name, original_base=convert, base_model_name_or_path=name_or_path)

    # --- adapters -------------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.configs

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active)

    @property
    def active_adapter(self) -> str:
        return self.active[0] if len(self.active) == 1 else list(self.active)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate these adapters and make exactly them trainable (peft semantics)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.set_active(*names)
        self.set_trainable(*names)

    def disable_adapter(self):
        return self.disabled()

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self.merge(adapter_names, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        self.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        if adapter_names is not None:
            self.set_active(*adapter_names)
        return super().merge_and_unload(safe=safe_merge)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                             majority_sign_method: str = "total", seed: int | None = None) -> None:
        from .methods.combine import add_weighted_adapter

        add_weighted_adapter(self, list(adapters), list(weights), adapter_name, combination_type,
                             svd_rank=svd_rank, density=density, majority_sign_method=majority_sign_method, seed=seed)

    # --- reporting ------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        report = self.param_report()
        return report.trainable, report.total

    def print_trainable_parameters(self) -> None:
        print(self.param_report())

    def get_base_model(self) -> nn.Module:
        return self.model

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is None:
            return super().forward(*args, **kwargs)
        with self.routed(adapter_names):
            return super().forward(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.model.generate(*args, **self.transformed_inputs(kwargs))
        with self.routed(adapter_names):
            return self.model.generate(*args, **self.transformed_inputs(kwargs))


def _forward_with_base_signature(model: PeftModel):
    """model.forward, advertising the base model's parameters (+ adapter_names) to signature readers: HF Trainer
    keeps only the dataset columns that the model's forward names."""
    forward = functools.partial(type(model).forward, model)
    base = inspect.signature(model.model.forward).parameters.values()
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = [p for p in base if p.kind != p.VAR_KEYWORD] + [extra] + [p for p in base if p.kind == p.VAR_KEYWORD]
    forward.__signature__ = inspect.Signature(params)
    return forward


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", **kwargs) -> PeftModel:
    """Wrap `model` and add one trainable, active adapter."""
    return PeftModel(model, peft_config, adapter_name)

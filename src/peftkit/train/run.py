"""What `peftkit train | eval | merge` do: load the recipe's model and data, measure, train, measure again.

Every run directory holds `adapter/` (PEFT format), `metrics.jsonl`, `eval.json` (before and after), `loss.png`
and the resolved `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from ..checkpoint import read_adapter
from ..compat import PeftModel
from ..core.calibrate import Calibration
from ..errors import DataError
from .data import Batcher, PromptTemplate, detect_format, read_csv, read_jsonl, rotten_tomatoes, split
from .evaluate import eval_loss, label_word_accuracy, seq_cls_accuracy
from .loop import TrainResult, train
from .recipe import DataSpec, Recipe, recipe_to_dict

__all__ = ["load_examples", "run_training", "evaluate_adapter", "merge_command"]


def load_examples(spec: DataSpec) -> list[dict[str, Any]]:
    """The recipe's examples: the embedded Rotten Tomatoes set, a .jsonl file or a .csv file."""
    if spec.source == "rotten_tomatoes":
        return rotten_tomatoes()
    path = Path(spec.source)
    if not path.is_file():
        raise DataError(f"data.source: {path} does not exist (use 'rotten_tomatoes' or a .jsonl/.csv path)")
    if ".csv" in path.suffixes:
        return read_csv(path, {"text": spec.text_column, "label": spec.label_column})
    examples = read_jsonl(path)
    if spec.text_column != "text" or spec.label_column != "label":
        examples = [{"text": e[spec.text_column], "label": e[spec.label_column]} for e in examples]
    return examples


def _splits(recipe: Recipe) -> tuple[list, list]:
    train_set, eval_set = split(load_examples(recipe.data), recipe.data.eval_size, recipe.data.seed)
    if recipe.data.train_limit:
        train_set = train_set[: recipe.data.train_limit]
    if not train_set:
        raise DataError(f"data.source {recipe.data.source}: nothing left to train on after holding out "
                        f"{recipe.data.eval_size} examples; lower data.eval_size")
    return train_set, eval_set


def _template(spec: DataSpec) -> PromptTemplate:
    return PromptTemplate(template=spec.template, label_words=dict(spec.label_words))


def make_eval(recipe: Recipe, tokenizer, eval_set: list) -> Callable[[Any], dict[str, float]]:
    """model -> metrics on the held-out split: accuracy for classification data, else the eval loss."""
    kind = detect_format(eval_set[0])
    batch_size, max_length = max(recipe.train.batch_size, 16), recipe.data.max_length
    if recipe.task == "seq_cls":
        batches = Batcher(eval_set, tokenizer, max_length=max_length, batch_size=batch_size, task="seq_cls")
        return lambda model: {"accuracy": seq_cls_accuracy(model, batches.batches_for_epoch(0))}
    if kind == "classification":
        template = _template(recipe.data)
        return lambda model: {"accuracy": label_word_accuracy(model, tokenizer, eval_set, template, batch_size,
                                                              max_length)}
    batches = Batcher(eval_set, tokenizer, max_length=max_length, batch_size=batch_size)
    return lambda model: {"eval_loss": eval_loss(model, batches.batches_for_epoch(0))}


def _num_labels(recipe: Recipe, examples: list) -> int:
    if recipe.task != "seq_cls":
        return 2
    return max(int(e["label"]) for e in examples) + 1


def _build(recipe: Recipe):
    from ..assets import load_model

    train_set, eval_set = _splits(recipe)
    model, tokenizer = load_model(recipe.model, recipe.task, num_labels=_num_labels(recipe, train_set + eval_set))
    return model, tokenizer, train_set, eval_set


def _summary(model: PeftModel, out: Path) -> str:
    report = model.param_report()
    size = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    return f"{report}; adapter file {size / 1024:.1f} KiB"


def run_training(recipe: Recipe, resume: str | None = None) -> TrainResult:
    """Train the recipe's adapter; prints and writes the held-out metrics before and after."""
    started = time.perf_counter()
    model, tokenizer, train_set, eval_set = _build(recipe)
    peft_model = PeftModel(model)
    config = recipe.adapter
    if config.task_type is None:  # recorded in adapter_config.json, as peft's task wrappers do
        config = config.replace(task_type="SEQ_CLS" if recipe.task == "seq_cls" else "CAUSAL_LM")
    batcher = Batcher(train_set, tokenizer, max_length=recipe.data.max_length, batch_size=recipe.train.batch_size,
                      task=recipe.task, template=_template(recipe.data), seed=recipe.train.seed)
    calibration = Calibration(islice(batcher.batches_for_epoch(0), recipe.train.calibration_batches))
    peft_model.add_adapter("default", config, calibration=calibration)  # read only by data-driven inits
    evaluate = make_eval(recipe, tokenizer, eval_set)
    print(f"model {recipe.model}: {len(train_set)} train / {len(eval_set)} held-out examples; "
          f"{peft_model.param_report()}")
    with peft_model.disabled():
        before = evaluate(peft_model)
    print(f"before training: {before}")
    result = train(peft_model, batcher.batches_for_epoch, recipe.train, eval_fn=evaluate, resume_from=resume)
    out = Path(recipe.train.output_dir)
    results = {"before": before, "after": result.eval, "steps": result.steps,
               "seconds": round(time.perf_counter() - started, 1)}
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    _write_config(recipe, out)
    print(f"after training ({result.steps} steps): {result.eval}; before: {before}")
    print(f"{_summary(peft_model, out)}; run directory: {out} ({results['seconds']} s)")
    return dataclasses.replace(result, eval=results)


def _write_config(recipe: Recipe, out: Path) -> None:
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def evaluate_adapter(recipe: Recipe, adapter_dir: str) -> dict[str, float]:
    """The recipe's held-out metric for a saved adapter (and for the base model alone)."""
    model, tokenizer, _, eval_set = _build(recipe)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    evaluate = make_eval(recipe, tokenizer, eval_set)
    with peft_model.disabled():
        base = evaluate(peft_model)
    return {"adapter": evaluate(peft_model), "base": base}


def merge_command(adapter_dir: str, out_dir: str, model_name: str | None) -> Path:
    """Merge an adapter into its base model (`--model`, else the config's base, else the embedded default)."""
    from ..assets import DEFAULT_MODEL, load_model
    from ..tools.merge import merge_to_dir

    config, _ = read_adapter(adapter_dir)
    name = model_name or DEFAULT_MODEL
    task = "seq_cls" if config.task_type == "SEQ_CLS" else "causal_lm"
    model, tokenizer = load_model(name, task)
    merge_to_dir(model, adapter_dir, out_dir, tokenizer=tokenizer)
    return Path(out_dir)

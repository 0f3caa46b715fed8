"""export_vllm: the exported adapter, loaded by the real peft on the same base, computes the same function;
information-losing exports are refused with ExportError naming the field, leaving out_dir untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import ExportError
from peftkit.tools import export_vllm

from .helpers import input_ids, logits, tiny_llama, trained_adapter

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _peft_logits(adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)), input_ids())


def _config(out) -> dict:
    return json.loads((out / "adapter_config.json").read_text())


FOLDED = {
    "rank_and_alpha_patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "down_proj": 6},
                                    alpha_pattern={"up_proj": 3}),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}),
    "rslora_with_alpha_pattern": dict(r=8, lora_alpha=4, use_rslora=True, alpha_pattern={"layers.1.mlp.up_proj": 16}),
}


@pytest.mark.parametrize("kwargs", FOLDED.values(), ids=FOLDED.keys())
def test_folded_export_matches_in_peft(tmp_path, kwargs):
    model, adapter_dir = trained_adapter(tmp_path / "adapter", target_modules=TARGETS, **kwargs)
    report = export_vllm(adapter_dir, tmp_path / "vllm")
    cfg = _config(tmp_path / "vllm")
    r_max = max([kwargs["r"], *kwargs.get("rank_pattern", {}).values()])
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], report.r) == (model.configs["default"].peft_type,
                                                                          r_max, r_max, r_max)
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["use_rslora"] is False
    assert cfg["use_dora"] is False and isinstance(cfg["target_modules"], list)
    assert sorted(cfg["target_modules"]) == sorted(report.modules) and len(report.modules) == 2 * len(TARGETS)
    shapes = {k: v.shape for k, v in load_file(tmp_path / "vllm" / "adapter_model.safetensors").items()}
    assert all(s[0] == r_max for k, s in shapes.items() if k.endswith("lora_A.weight"))
    assert all(s[1] == r_max for k, s in shapes.items() if k.endswith("lora_B.weight"))
    torch.testing.assert_close(_peft_logits(tmp_path / "vllm"), logits(model, input_ids()), atol=ATOL, rtol=0)


def test_uniform_adapter_passes_through_unchanged(tmp_path):
    model, adapter_dir = trained_adapter(tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True)
    report = export_vllm(adapter_dir, tmp_path / "vllm")
    assert report.folded == () and report.padded == () and report.lora_alpha == pytest.approx(16.0)
    before = load_file(adapter_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_peft_logits(tmp_path / "vllm"), logits(model, input_ids()), atol=ATOL, rtol=0)


def test_converted_base_mutating_init_exports(tmp_path):
    """An adapter whose init changed the base, saved converted for the original base, exports fine."""
    model, adapter_dir = trained_adapter(tmp_path / "adapter", convert=True, r=2, lora_alpha=4,
                                         init_lora_weights="olora", rank_pattern={"up_proj": 4})
    export_vllm(adapter_dir, tmp_path / "vllm")
    torch.testing.assert_close(_peft_logits(tmp_path / "vllm"), logits(model, input_ids()), atol=ATOL, rtol=0)


REFUSED = {
    "magnitude": (dict(use_dora=True), "use_dora"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    "bias_all": (dict(bias="all"), "bias"),
    "bias_lora_only": (dict(bias="lora_only"), "bias"),
    "lora_bias": (dict(lora_bias=True), "lora_bias"),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), "target_modules"),
    "unconverted_init": (dict(init_lora_weights="pissa"), "init_lora_weights"),
}


@pytest.mark.parametrize("kwargs, field", REFUSED.values(), ids=REFUSED.keys())
def test_refusals_name_the_field_and_leave_out_dir_alone(tmp_path, kwargs, field):
    _, adapter_dir = trained_adapter(tmp_path / "adapter", r=2, **kwargs)
    with pytest.raises(ExportError, match=rf"^{field}: "):
        export_vllm(adapter_dir, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ExportError):
        export_vllm(adapter_dir, existing, overwrite=True)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "existing"]  # no temp dirs left


def test_non_empty_out_dir_needs_overwrite(tmp_path):
    _, adapter_dir = trained_adapter(tmp_path / "adapter", r=2)
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_vllm(adapter_dir, tmp_path / "vllm")
    export_vllm(adapter_dir, tmp_path / "vllm", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]

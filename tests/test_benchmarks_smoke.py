"""Smoke test for benchmarks/train_step.py: the tiny --quick run completes and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
CASES = ("floor", "peft-lora", "peftkit-lora", "peft-dora", "peftkit-dora")


@pytest.mark.slow
def test_train_step_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--steps", "2", "--warmup", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "x floor" in proc.stdout

    report = json.loads(out.read_text())
    assert report["quick"] is True
    for key in ("torch", "peft", "peftkit", "cpu", "threads"):
        assert key in report["env"]
    assert report["env"]["threads"] == 1
    assert set(report["cases"]) == set(CASES)
    for case, r in report["cases"].items():
        assert r["steps"] == 2
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["peak_rss_mb"] > 0
        assert r["x_floor"] > 0
        assert (r["trainable_params"] == 0) == (case == "floor")
    # same seed, same data, adapters start as the identity: every case sees the same first loss
    first = {r["first_loss"] for r in report["cases"].values()}
    assert max(first) - min(first) < 1e-4
    assert set(report["peftkit_over_peft"]) == {"lora", "dora"}


@pytest.mark.slow
def test_methods_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "methods.json"
    script = ROOT / "benchmarks" / "methods.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--only", "lora", "dora", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    cases = [r["case"] for r in report["rows"]]
    assert cases == ["floor:", "peftkit:dora", "peft:dora", "peftkit:lora", "peft:lora", "floor:"]
    rows = {r["case"]: r for r in report["rows"]}
    assert all("error" not in r and 0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in report["rows"])
    for method in ("lora", "dora"):  # same model, data, config and seed: same parameter count and first loss
        ours, theirs = rows[f"peftkit:{method}"], rows[f"peft:{method}"]
        assert ours["trainable_params"] == theirs["trainable_params"] > 0
        assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-4
    assert out.with_suffix(".md").read_text().count("| peft |") == 2


@pytest.mark.slow
def test_serving_quick(tmp_path):
    """benchmarks/serving.py --quick (op, e2e, registration): tables printed, JSON with every workload row."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "serving.json"
    script = ROOT / "benchmarks" / "serving.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--sections", "op,e2e,registration",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "== op" in proc.stdout and "== e2e" in proc.stdout and "== registration" in proc.stdout
    report = json.loads(out.read_text())
    assert report["quick"] is True
    for key in ("distinct/16", "uniform/16", "zipf/64", "identical/64"):
        row = report["op"][key]
        assert all(row[b] > 0 for b in ("segment", "gather", "auto", "peft")), row
    for n in ("1", "8"):
        row = report["e2e"][n]
        assert row["peftkit_tok_s"] > 0 and row["base_tok_s"] > 0 and row["peft_mixed_tok_s"] > 0
    assert set(report["registration"]) == {"10", "100"}

"""Recipes: the embedded default parses, dotted overrides apply, and switching the method keeps only the
recipe's adapter fields the new method has."""

from __future__ import annotations

import pytest

from peftkit import ConfigError
from peftkit.train.recipe import load_recipe


def test_embedded_default_and_overrides() -> None:
    recipe = load_recipe(None, {"train.lr": 3e-4, "adapter.r": 4})
    assert recipe.train.lr == 3e-4 and recipe.adapter.r == 4 and recipe.adapter.method == "lora"


def test_switching_method_drops_fields_it_lacks(capsys: pytest.CaptureFixture) -> None:
    recipe = load_recipe(None, {"adapter.method": "ia3", "adapter.target_modules": ["q_proj", "v_proj"]})
    assert recipe.adapter.method == "ia3" and recipe.adapter.target_modules == ("q_proj", "v_proj")
    assert "['lora_alpha', 'r'] do not apply to method 'ia3'" in capsys.readouterr().err
    kept = load_recipe(None, {"adapter.method": "dora"})
    assert (kept.adapter.method, kept.adapter.r, kept.adapter.lora_alpha) == ("dora", 8, 16), "shared fields stay"


def test_switching_method_still_validates_command_line_fields() -> None:
    with pytest.raises(ConfigError, match="lora_alpha"):
        load_recipe(None, {"adapter.method": "ia3", "adapter.lora_alpha": 4})

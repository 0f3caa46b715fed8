"""save_adapter -> load_adapter round-trips exactly."""

from __future__ import annotations

import copy

import torch

import peftkit
from peftkit import AdapterModel

from .conftest import Env, assert_state_equal, state


def test_save_load_round_trip(adapted: Env, tmp_path) -> None:
    out = adapted.out()
    peftkit.save_adapter(adapted.model, tmp_path, "default")
    loaded = AdapterModel(copy.deepcopy(adapted.pristine))
    peftkit.load_adapter(loaded, tmp_path, "default")
    assert torch.equal(adapted.out(loaded), out)
    assert_state_equal(state(loaded), state(adapted.model))
    assert loaded.configs["default"] == adapted.model.current_config("default")


def test_save_load_second_adapter(adapted: Env, tmp_path) -> None:
    adapted.add("b", seed=2, active=False)
    with_b = AdapterModel(copy.deepcopy(adapted.pristine))
    peftkit.save_adapter(adapted.model, tmp_path / "a", "default")
    peftkit.save_adapter(adapted.model, tmp_path / "b", "b")
    peftkit.load_adapter(with_b, tmp_path / "a", "default")
    peftkit.load_adapter(with_b, tmp_path / "b", "b", active=False)
    assert_state_equal(state(with_b), state(adapted.model))
    for names in (("default",), ("b",), ("default", "b")):
        adapted.model.set_active(*names)
        with_b.set_active(*names)
        assert torch.equal(adapted.out(with_b), adapted.out()), names

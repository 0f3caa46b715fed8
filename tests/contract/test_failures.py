"""A failed call leaves the model unchanged and names what to fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import peftkit
from peftkit import AdapterNameError, ConfigError, MergeError, NonFiniteWeightError, NoTargetMatchedError

from .conftest import TINY_FIELDS, Env, adapter_params, assert_state_equal, hosts, make_config, state, structure


def _assert_no_target_leaves_model_unchanged(env: Env) -> None:
    before, shape = state(env.model), structure(env.model)
    configs, active = dict(env.model.configs), env.model.active
    with pytest.raises(NoTargetMatchedError):
        env.model.add_adapter("other", make_config(env.method, ["no_such_module_xyz"], **TINY_FIELDS))
    assert_state_equal(state(env.model), before)
    assert structure(env.model) == shape
    assert env.model.configs == configs and env.model.active == active


def test_no_target_matched_on_fresh_model(env: Env) -> None:
    _assert_no_target_leaves_model_unchanged(env)


def test_no_target_matched_with_existing_adapter(adapted: Env) -> None:
    _assert_no_target_leaves_model_unchanged(adapted)


def test_invalid_rank_names_field(env: Env) -> None:
    fields = {f.name for f in dataclasses.fields(peftkit.get_method(env.method).config_cls)}
    if "r" not in fields:
        pytest.skip("the config has no rank field 'r'")
    with pytest.raises(ConfigError) as info:
        env.config(r=0)
    assert info.value.field == "r"
    assert "r" in str(info.value)


def test_unsafe_merge_raises_and_changes_nothing(adapted: Env) -> None:
    adapted.require("mergeable")
    nan_params = adapter_params(adapted.model, "default")
    with torch.no_grad():
        for p in nan_params:
            p.fill_(float("nan"))
    before, shape = state(adapted.model), structure(adapted.model)
    with pytest.raises(NonFiniteWeightError):
        adapted.model.merge(safe=True)
    assert not any(h.merged for _, h in hosts(adapted.model))
    assert_state_equal(state(adapted.model), before)
    assert structure(adapted.model) == shape


@pytest.mark.parametrize("name", ["a.b", "a/b", "__base__", ""])
def test_invalid_adapter_name_raises_and_changes_nothing(env: Env, name: str) -> None:
    before, shape = state(env.model), structure(env.model)
    with pytest.raises(AdapterNameError):
        env.model.add_adapter(name, env.config())
    assert_state_equal(state(env.model), before)
    assert structure(env.model) == shape and env.model.configs == {}


def test_delete_merged_adapter_raises_and_changes_nothing(adapted: Env) -> None:
    adapted.require("mergeable")
    adapted.model.merge()
    before, shape, out = state(adapted.model), structure(adapted.model), adapted.out()
    with pytest.raises(MergeError):
        adapted.model.delete_adapter("default")
    assert_state_equal(state(adapted.model), before)
    assert structure(adapted.model) == shape and "default" in adapted.model.configs
    assert torch.equal(adapted.out(), out)


def test_make_config_selects_the_method(method: str) -> None:
    """The suite's own hook: a config derived from the registry builds the method it was asked for."""
    config = make_config(method, ["x"], **TINY_FIELDS)
    assert config.method == method
    assert isinstance(config, peftkit.get_method(method).config_cls)

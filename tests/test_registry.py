"""The registry: every method is reachable by name, builds a config that selects it, and documents itself."""

from __future__ import annotations

import dataclasses

import pytest

import peftkit
from peftkit.errors import ConfigError, UnknownMethodError


@pytest.mark.parametrize("name", peftkit.method_names())
def test_make_config_selects_the_method(name):
    spec = peftkit.get_method(name)
    required = {"total_step": 10}  # fields some methods require (rank schedules), passed where the config has them
    has = {f.name for f in dataclasses.fields(spec.config_cls)}
    config = spec.make_config(target_modules=["proj"], **{k: v for k, v in required.items() if k in has})
    assert config.method == name
    assert isinstance(config, spec.config_cls)
    assert spec.summary, f"{spec.adapter_cls.__name__} needs a docstring whose first line names the paper"


@pytest.mark.parametrize("name", peftkit.method_names())
def test_make_config_rejects_unknown_fields(name):
    with pytest.raises(ConfigError, match="valid fields"):
        peftkit.get_method(name).make_config(target_modules=["proj"], not_a_field=1)


@pytest.mark.parametrize("name", peftkit.method_names())
def test_config_fields_have_defaults(name):
    cls = peftkit.get_method(name).config_cls
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert missing == []


def test_unknown_method():
    with pytest.raises(UnknownMethodError):
        peftkit.get_method("nope")


def _methods_index_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "methods_index.py"
    spec = importlib.util.spec_from_file_location("methods_index", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_has_a_docs_page_and_the_index_is_current():
    index = _methods_index_module()
    for name in peftkit.method_names():
        page = index.INDEX.parent / (peftkit.get_method(name).adapter_cls.__module__.rsplit(".", 1)[-1] + ".md")
        assert page.is_file(), f"{name}: no docs page {page.name}"
    assert index.INDEX.read_text() == index.render(), "docs/methods/README.md is stale: run scripts/methods_index.py"

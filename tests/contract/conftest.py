"""Fixtures and helpers of the contract suite (principle 8 of the architecture guide).

Every test is parametrized over every registered method (`peftkit.method_names()`) and over tiny models built
in code. Methods are never named here: a config is derived from the registry (`make_config`) and tests skip
only on declared capabilities or on `UnsupportedLayerError` raised at injection.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import peftkit
from peftkit import AdapterConfig, AdapterModel, Calibration, UnsupportedLayerError
from peftkit.core.host import AdaptedLayer

SEED = 0
BATCH = 4
NOISE = 0.1
# Sizes for tiny models, applied to every config that has the field (others drop it): a small rank, and a
# vector-bank sub-vector length that divides the tiny layers' widths.
TINY_FIELDS = {"r": 4, "vector_length": 8, "num_vectors": 16, "total_step": 40}  # total_step: rank schedules


# --- configs ------------------------------------------------------------------------------------------------
def make_config(method_name: str, target_modules: Any, **overrides: Any) -> AdapterConfig:
    """A config of `method_name` with defaults, `target_modules` and those `overrides` the config has.

    The registry's `config_defaults` select the method when one config class serves several (e.g. a flag or an
    init name). Overrides naming a field the config does not have are dropped (e.g. `r=4` for a rank-free method).
    """
    spec = peftkit.get_method(method_name)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    config = spec.make_config(target_modules=target_modules, **{k: v for k, v in overrides.items() if k in fields})
    assert config.method == method_name, f"config_defaults of {method_name!r} select {config.method!r}"
    return config


# --- tiny models ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))  # (B, 8)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, 6, 6)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, 3, 3)
        return self.head(h.flatten(1))  # (B, 10)


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T)
        return self.head(torch.tanh(self.proj(self.emb(ids))))  # (B, T, 8)


def _transformers():
    return pytest.importorskip("transformers")


def _llama() -> nn.Module:
    t = _transformers()
    cfg = t.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=64, intermediate_size=64, use_cache=False, attn_implementation="eager")
    return t.LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    t = _transformers()
    cfg = t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, use_cache=False,
                       bos_token_id=0, eos_token_id=0,
                       attn_implementation="eager")
    return t.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    t = _transformers()
    cfg = t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       vocab_size=64, max_position_embeddings=32, attn_implementation="eager")
    return t.BertModel(cfg)


def _ids(g: torch.Generator) -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, 64, (BATCH, 5), generator=g)}


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).logits  # (B, T, vocab)


def _bert_out(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(**batch)
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)  # (B, T*H + H)


def _call(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["x"])


@dataclass(frozen=True)
class Case:
    """A tiny model: how to build it, its inputs (batch-first, `BATCH` rows), its output tensor, its targets."""

    name: str
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[torch.Generator], dict[str, Tensor]]
    output_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    targets: Any

    def build(self) -> nn.Module:
        torch.manual_seed(SEED)
        return self.build_fn().eval()

    def inputs(self) -> dict[str, Tensor]:
        return self.inputs_fn(torch.Generator().manual_seed(SEED + 1))


CASES = [
    Case("mlp", MLP, lambda g: {"x": torch.randn(BATCH, 16, generator=g)}, _call, "all-linear"),
    Case("conv", ConvNet, lambda g: {"x": torch.randn(BATCH, 3, 6, 6, generator=g)}, _call,
         ["conv1", "conv2", "head"]),
    Case("embedding", EmbeddingNet, lambda g: {"x": torch.randint(0, 64, (BATCH, 5), generator=g)}, _call,
         ["emb", "proj", "head"]),
    Case("llama", _llama, _ids, _logits,
         ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
    Case("gpt2", _gpt2, _ids, _logits, "all-linear"),  # Conv1D layers; the tied lm_head is left alone
    Case("bert", _bert, _ids, _bert_out, ["word_embeddings", "query", "key", "value", "dense"]),
]


# --- helpers --------------------------------------------------------------------------------------------------
def hosts(model: AdapterModel) -> list[tuple[str, AdaptedLayer]]:
    return [(p, h) for p, h in model.hosts() if isinstance(h, AdaptedLayer)]


def adapter_params(model: AdapterModel, name: str | None = None) -> list[nn.Parameter]:
    """Parameters of adapter `name` (every adapter when None), found through the hosts."""
    out = []
    for _, host in hosts(model):
        for adapter_name, adapter in host.adapters.items():
            if name is None or adapter_name == name:
                out.extend(adapter.parameters())
    return out


def perturb(params: list[nn.Parameter], seed: int) -> None:
    """Add seeded noise so adapters are non-trivial (identity-at-init would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(NOISE * torch.randn(p.shape, generator=g, dtype=p.dtype))


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def structure(module: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in module.named_modules()]


def assert_state_equal(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 0.0) -> None:
    """Same keys and values (exactly by default; NaN equals NaN)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


def close(actual: Tensor, expected: Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@contextmanager
def active(model: AdapterModel, *names: str) -> Iterator[AdapterModel]:
    """Activate exactly `names` for the block, then restore the previous selection."""
    before = model.active
    model.set_active(*names)
    try:
        yield model
    finally:
        model.set_active(*before)


class Env:
    """One (method, model) pair: the base model's output, a wrapped model and a way to run it."""

    def __init__(self, method: str, case: Case) -> None:
        self.method, self.case = method, case
        self.spec = peftkit.get_method(method)
        self.batch = case.inputs()
        self.base_model = case.build()
        with torch.no_grad():
            self.base_out = case.output_fn(self.base_model, self.batch)
        self.pristine = copy.deepcopy(self.base_model)
        self.model = AdapterModel(self.base_model)

    def config(self, **overrides: Any) -> AdapterConfig:
        return make_config(self.method, self.case.targets, **{**TINY_FIELDS, **overrides})

    def add(self, name: str = "default", seed: int | None = None, **kwargs: Any) -> None:
        """Add adapter `name` (skipping the test when the method cannot adapt a targeted layer type);
        with `seed`, perturb its parameters."""
        if self.spec.adapter_cls.calibration and "calibration" not in kwargs:
            kwargs["calibration"] = self.calibration()
        try:
            self.model.add_adapter(name, self.config(), **kwargs)
        except UnsupportedLayerError as e:
            pytest.skip(f"{self.method} does not support a layer of {self.case.name}: {e}")
        if seed is not None:
            perturb(adapter_params(self.model, name), seed)

    def calibration(self) -> Calibration:
        """Data for methods that initialize from data: the test batch, with the squared output as the loss."""
        return Calibration([self.batch], lambda model, batch: self.case.output_fn(model, batch).float().square().mean())

    def out(self, model: nn.Module | None = None, batch: dict[str, Tensor] | None = None) -> Tensor:
        with torch.no_grad():
            return self.case.output_fn(self.model if model is None else model, batch or self.batch)

    def row(self, i: int) -> dict[str, Tensor]:
        return {k: v[i:i + 1] for k, v in self.batch.items()}

    def require(self, capability: str) -> None:
        if capability not in self.spec.adapter_cls.capabilities:
            pytest.skip(f"{self.method} does not declare capability {capability!r}")


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(params=peftkit.method_names())
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture
def env(method: str, case: Case) -> Env:
    """A fresh seeded base model wrapped in an AdapterModel, with no adapter yet."""
    return Env(method, case)


@pytest.fixture
def adapted(env: Env) -> Env:
    """`env` with adapter "default" added and perturbed (non-trivial)."""
    env.add("default", seed=1)
    return env


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and spinning threads slow down a shared 2-CPU box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

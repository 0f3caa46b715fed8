"""Engine: continuous batching gives each request exactly the greedy tokens it gets alone with its adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import AdapterModel, LoraConfig, load_adapter, save_adapter
from peftkit.serve.engine import Engine
from peftkit.serve.model import ServingModel
from peftkit.serve.store import AdapterStore
from peftkit.serve.types import GenerationRequest

VOCAB = 64
ADAPTERS = {  # name: (LoraConfig fields, seed) - mixed ranks, targets, rsLoRA and DoRA
    "a": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1),
    "b": (dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True), 2),
    "c": (dict(r=8, lora_alpha=8, target_modules=["o_proj", "down_proj"]), 3),
    "d": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], use_dora=True), 4),
}


def tiny_llama(dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # spread the logits
    return model.eval()


def save_random(directory: Path, fields: dict, seed: int) -> Path:
    am = AdapterModel(tiny_llama())
    am.add_adapter("x", LoraConfig(init_lora_weights=False, **fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return save_adapter(am, directory, "x")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_random(root / name, fields, seed) for name, (fields, seed) in ADAPTERS.items()}


def solo(dirs, adapter: str | None, prompt: list[int], max_new: int, stop=()) -> list[int]:
    """The non-serving path: AdapterModel + load_adapter + set_active, full forward per token, argmax."""
    am = AdapterModel(tiny_llama())
    if adapter is not None:
        load_adapter(am, dirs[adapter], name=adapter)
        am.set_active(adapter)
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_new:
            token = int(am(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
    return out


def make_engine(dirs, backend="segment", **kw) -> Engine:
    store = AdapterStore()
    engine = Engine(ServingModel(tiny_llama(), backend=backend), store, **kw)
    for name, path in dirs.items():
        store.register(name, path)
    return engine


def run(engine: Engine, arrivals: dict[int, list[GenerationRequest]], max_steps: int = 500):
    got: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    step = 0
    while step < max_steps and (engine.has_work() or any(k >= step for k in arrivals)):
        for req in arrivals.get(step, []):
            engine.add_request(req)
        for ev in engine.step():
            if ev.token_id is not None:
                got.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                reasons[ev.request_id] = ev.finish_reason
        step += 1
    return got, reasons


def _requests():
    g = torch.Generator().manual_seed(7)
    names = [None, "a", "b", "c", "d", "a", "b", None, "d", "c", "a"]
    reqs = []
    for i, name in enumerate(names):
        prompt = torch.randint(VOCAB, (3 + 2 * (i % 4),), generator=g).tolist()
        reqs.append(GenerationRequest(f"r{i}", prompt, name, max_new_tokens=3 + i % 5))
    return reqs


@pytest.mark.parametrize("backend", ["segment", "gather"])
def test_greedy_outputs_equal_running_alone(adapter_dirs, backend):
    """Requests arrive at different steps, mixed prefill and decode, 4 adapters + base, cap of 2 per step."""
    reqs = _requests()
    arrivals = {0: reqs[:3], 1: reqs[3:5], 3: reqs[5:8], 6: reqs[8:]}
    engine = make_engine(adapter_dirs, backend, max_batch=6, max_adapters_per_step=2)
    got, reasons = run(engine, arrivals)
    for req in reqs:
        expected = solo(adapter_dirs, req.adapter, req.prompt_ids, req.max_new_tokens)
        assert got[req.request_id] == expected, (req.request_id, req.adapter)
        assert reasons[req.request_id] == "length"
    outs = {tuple(solo(adapter_dirs, n, reqs[0].prompt_ids, 6)) for n in (None, *ADAPTERS)}
    assert len(outs) >= 4, "the adapters must change the greedy output for this test to mean anything"
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["cache"]["misses"] + stats["cache"]["prefetches"] >= 4


def test_stop_tokens_and_abort(adapter_dirs):
    engine = make_engine(adapter_dirs)
    prompt = [5, 9, 13, 2]
    free = solo(adapter_dirs, "a", prompt, 6)
    stop = (free[2],)
    engine.add_request(GenerationRequest("s", prompt, "a", max_new_tokens=6, stop_token_ids=stop))
    engine.add_request(GenerationRequest("x", prompt, "b", max_new_tokens=50))
    got, reasons = {}, {}
    for i in range(20):
        if i == 2:
            engine.abort("x")
        for ev in engine.step():
            got.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                reasons[ev.request_id] = ev.finish_reason
    assert got["s"] == free[:free.index(stop[0]) + 1] and reasons["s"] == "stop"
    assert reasons["x"] == "abort" and got["x"][-1] is None and len(got["x"]) <= 4
    assert not engine.has_work()


def test_bad_requests_have_clear_errors(adapter_dirs):
    engine = make_engine(adapter_dirs)
    with pytest.raises(KeyError, match="unknown adapter 'nope'; registered adapters: a, b, c, d"):
        engine.add_request(GenerationRequest("1", [1, 2], "nope", 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request(GenerationRequest("1", [1, 2], "a", 0))
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.add_request(GenerationRequest("1", [], "a", 3))
    engine.add_request(GenerationRequest("1", [1, 2], "a", 3))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request(GenerationRequest("1", [1, 2], "a", 3))


def test_adapter_cap_without_starvation(adapter_dirs):
    """Cap 1: a stream of 'a' requests cannot keep the older 'c' request waiting past the aging limit."""
    engine = make_engine(adapter_dirs, max_adapters_per_step=1, aging_steps=2)
    engine.add_request(GenerationRequest("a0", [1, 2, 3], "a", 4))
    engine.add_request(GenerationRequest("c0", [4, 5, 6], "c", 2))
    finished_at, seen = {}, set()
    for step in range(40):
        engine.add_request(GenerationRequest(f"a{step + 1}", [1, 2, 3], "a", 4))
        events = engine.step()
        seen.update(engine._slots[0])  # the adapters of the step just run
        assert len(engine._slots[0]) <= 1
        for ev in events:
            if ev.finished:
                finished_at[ev.request_id] = step
        if "c0" in finished_at:
            break
    assert "c0" in finished_at and finished_at["c0"] < 15 and seen == {"a", "c"}


def test_corrupt_adapter_fails_only_its_request(adapter_dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in adapter_dirs["a"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    engine = make_engine(adapter_dirs)
    engine.store.register("bad", bad)  # header intact: registration is lazy
    data[-64:] = b"\xff" * 64  # corrupt tensor data (NaN patterns) after registration
    weights.write_bytes(bytes(data))
    engine.add_request(GenerationRequest("bad1", [1, 2], "bad", 3))
    engine.add_request(GenerationRequest("ok", [1, 2], "a", 3))
    got, reasons = run(engine, {})
    assert reasons["bad1"].startswith("error: NonFiniteWeightError") and str(bad) in reasons["bad1"]
    assert got["ok"] == solo(adapter_dirs, "a", [1, 2], 3)


def test_steady_decode_reuses_the_batched_cache(adapter_dirs, monkeypatch):
    """Decode steps reuse the last forward's cache (rows dropped as requests finish, left padding cut); a join
    rebuilds. Greedy outputs stay equal to running alone, with the grouped op (`auto`) and the segment op."""
    from peftkit.serve import engine as engine_mod

    calls = {"decode": 0, "build": 0}
    real_decode, real_build = engine_mod.decode_batch, engine_mod.build_batch

    def decode(*args):
        calls["decode"] += 1
        return real_decode(*args)

    def build(*args):
        calls["build"] += 1
        return real_build(*args)

    monkeypatch.setattr(engine_mod, "decode_batch", decode)
    monkeypatch.setattr(engine_mod, "build_batch", build)
    g = torch.Generator().manual_seed(11)
    names = ["a", "b", "c", "d", None, "a"]
    reqs = [GenerationRequest(f"q{i}", torch.randint(VOCAB, (2 + 3 * i,), generator=g).tolist(), name, 2 + 2 * i)
            for i, name in enumerate(names)]
    late = GenerationRequest("late", [3, 1, 4, 1, 5], "b", 4)
    engine = make_engine(adapter_dirs, "auto", max_batch=8, max_adapters_per_step=4)
    got, _ = run(engine, {0: reqs, 3: [late]})
    for req in [*reqs, late]:
        assert got[req.request_id] == solo(adapter_dirs, req.adapter, req.prompt_ids, req.max_new_tokens)
    assert calls["decode"] >= 8 and calls["build"] <= 4, calls

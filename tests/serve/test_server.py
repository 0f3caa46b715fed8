"""The OpenAI-compatible HTTP server on a real engine, a tiny Llama, a word-level tokenizer and saved adapters.

Every generated text is checked against the non-serving path (AdapterModel + load_adapter + set_active, greedy
argmax over full forwards), so each response is known to come from the adapter it asked for.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from peftkit import AdapterModel, LoraConfig, load_adapter, save_adapter  # noqa: E402
from peftkit.serve.engine import Engine  # noqa: E402
from peftkit.serve.launch import ServeOptions, ThreadedServer, build_app, parse_adapter_specs  # noqa: E402
from peftkit.serve.server import create_app  # noqa: E402
from peftkit.serve.store import AdapterStore  # noqa: E402

WORDS = ("the a is was and not very good bad film movie plot acting fun boring great hello hi there what why how "
         "yes no it user assistant system sql query table select from where cat dog red blue green one two").split()
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")
BASE = "tiny-base"
PROMPT = "the film was very"


# ---------------------------------------------------------------------------------------------- the world


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + [":", ".", "!", "?", ","])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # spread the logits: greedy choices far from ties
    return model.eval()


def save_random_adapter(vocab_size: int, directory: Path, seed: int, targets: list[str]) -> Path:
    am = AdapterModel(tiny_llama(vocab_size))
    am.add_adapter("x", LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return save_adapter(am, directory, "x")


def reference(world, adapter: str | None, ids: list[int], max_new: int, stop=()) -> list[int]:
    """Greedy tokens through the non-serving path: full forward per token, argmax, stop after a stop token."""
    am = AdapterModel(tiny_llama(world.vocab))
    if adapter is not None:
        load_adapter(am, world.paths[adapter], name=adapter)
        am.set_active(adapter)
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_new:
            token = int(am.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
    return out


class World:
    def __init__(self, root: Path) -> None:
        self.tok = tiny_tokenizer()
        self.vocab = len(self.tok)
        self.root = root / "adapters"
        self.paths = {
            "alpha": save_random_adapter(self.vocab, self.root / "alpha", 1, ["q_proj", "v_proj"]),
            "beta": save_random_adapter(self.vocab, self.root / "beta", 2, ["q_proj", "v_proj", "up_proj"]),
            "gamma": save_random_adapter(self.vocab, self.root / "gamma", 3, ["o_proj", "down_proj"]),
        }
        self.eos = self.tok.eos_token_id
        self._refs: dict = {}

    def ids(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def text(self, adapter: str | None, prompt_ids: list[int], max_new: int, ignore_eos: bool = False) -> str:
        key = (adapter, tuple(prompt_ids), max_new, ignore_eos)
        if key not in self._refs:
            stop = () if ignore_eos else (self.eos,)
            self._refs[key] = reference(self, adapter, prompt_ids, max_new, stop)
        return self.tok.decode(self._refs[key], skip_special_tokens=True)

    def engine(self, names=("alpha", "beta")) -> Engine:
        store = AdapterStore()
        for name in names:
            store.register(name, str(self.paths[name]))
        return Engine(tiny_llama(self.vocab), store, max_batch=8, max_adapters_per_step=4)

    def app(self, names=("alpha", "beta"), roots=None, **kw):
        roots = [self.root] if roots is None else roots
        return create_app(self.engine(names), self.tok, adapter_roots=roots, served_model_name=BASE, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(world):
    with TestClient(world.app(max_prompt_tokens=64, max_new_tokens=300, max_body_bytes=4096)) as c:
        yield c


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status and body["message"]
    return body["message"]


# ---------------------------------------------------------------------------------------------- endpoints


def test_models_lists_base_and_adapters(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    assert ids == [BASE, "alpha", "beta"]
    assert all(m["parent"] == BASE for m in data["data"][1:])


def test_completions_use_the_requested_adapter(client, world):
    texts = {}
    for model in (BASE, "alpha", "beta"):
        r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        adapter = None if model == BASE else model
        texts[model] = body["choices"][0]["text"]
        assert texts[model] == world.text(adapter, world.ids(PROMPT), 8)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] == len(world.ids(PROMPT))
    assert len(set(texts.values())) == 3, f"adapters must change the output for this test to mean anything: {texts}"


def test_completion_prompt_forms(client, world):
    ids = world.ids("hello there")
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": [PROMPT, ids], "max_tokens": 5})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == [world.text("alpha", world.ids(PROMPT), 5), world.text("alpha", ids, 5)]


def test_chat_completion_matches_reference(client, world):
    messages = [{"role": "system", "content": "you are a sql assistant"},
                {"role": "user", "content": [{"type": "text", "text": "select what from the table ?"}]}]
    r = client.post("/v1/chat/completions", json={"model": "beta", "messages": messages, "max_tokens": 6,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
            for m in messages]
    text = world.tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    ids = world.tok(text, add_special_tokens=False)["input_ids"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": world.text("beta", ids, 6)}
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_streaming_completion_equals_the_whole_response(client, world):
    request = {"model": "alpha", "prompt": PROMPT, "max_tokens": 10, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=request) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["usage"]["completion_tokens"] == 10 and chunks[-1]["choices"] == []
    pieces = [c["choices"][0] for c in chunks[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(p["text"] for p in pieces) == world.text("alpha", world.ids(PROMPT), 10, ignore_eos=True)
    assert pieces[-1]["finish_reason"] == "length" and all(p["finish_reason"] is None for p in pieces[:-1])
    assert len(pieces) > 1  # streamed, not one blob


def test_streaming_chat_sends_role_then_content(client, world):
    messages = [{"role": "user", "content": "hello"}]
    request = {"model": BASE, "messages": messages, "max_completion_tokens": 5, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=request) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    ids = world.tok(world.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]
    assert "".join(d.get("content", "") for d in deltas) == world.text(None, ids, 5)


def test_stop_strings_cut_the_text(client, world):
    full = world.text("alpha", world.ids(PROMPT), 12, ignore_eos=True)
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    expected = full[:full.index(stop)]
    for stream in (False, True):
        request = {"model": "alpha", "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "stop": [stop],
                   "stream": stream}
        if stream:
            with client.stream("POST", "/v1/completions", json=request) as r:
                pieces = [e["choices"][0] for e in sse_events(r.iter_lines())[:-1]]
            text, finish = "".join(p["text"] for p in pieces), pieces[-1]["finish_reason"]
        else:
            choice = client.post("/v1/completions", json=request).json()["choices"][0]
            text, finish = choice["text"], choice["finish_reason"]
        assert (text, finish) == (expected, "stop")


def test_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'peftkit_http_requests_total{path="/v1/completions",status="200"}' in text
    assert "peftkit_generation_tokens_total" in text and "peftkit_engine_steps_total" in text
    assert "peftkit_engine_running" in text  # the engine's own stats are exported
    data = client.get("/metrics", params={"format": "json"}).json()
    assert data["requests_total"] >= 1 and data["adapters_loaded"] == 2


# ---------------------------------------------------------------------------------------------- 4xx paths


@pytest.mark.parametrize("model", ["../alpha", "a/b", "a\\b", "..", ".hidden"])
def test_adapter_names_with_path_parts_are_400(client, model):
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT})
    assert "not a valid adapter name" in error_of(r, 400)


def test_unknown_adapter_is_404(client):
    msg = error_of(client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT}), 404)
    assert "nope" in msg and "alpha" in msg
    error_of(client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                      "content": "hi"}]}), 404)


def test_malformed_bodies(client):
    r = client.post("/v1/completions", content=b'{"model": "alpha", "prompt": ',
                    headers={"content-type": "application/json"})
    assert "not valid JSON" in error_of(r, 400)
    assert "JSON object" in error_of(client.post("/v1/completions", json=[1, 2]), 400)
    assert "prompt" in error_of(client.post("/v1/completions", json={"model": "alpha"}), 422)
    assert "max_tokens" in error_of(client.post("/v1/completions", json={"model": "alpha", "prompt": "hi",
                                                                         "max_tokens": "many"}), 422)
    msg = error_of(client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "robot",
                                                                                              "content": "x"}]}), 422)
    assert "messages.0.role" in msg


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "hi " * 65}, 400, "prompt"),  # 65 tokens > max_prompt_tokens=64
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [10_000]}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 301}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 0.7}, 400, "temperature"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "echo": True}, 400, "echo"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop"),
])
def test_bad_generation_fields(client, body, status, field):
    r = client.post("/v1/completions", json={"model": "alpha", **body})
    error_of(r, status)
    assert r.json()["error"]["param"] == field


def test_oversized_body_is_413(client):
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "hi " * 2000})
    assert "larger than" in error_of(r, 413)


# ---------------------------------------------------------------------------------------------- runtime adapters


def test_load_and_unload_at_runtime(world):
    with TestClient(world.app(names=("alpha",))) as client:
        error_of(client.post("/v1/completions", json={"model": "gamma", "prompt": PROMPT}), 404)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma"})
        assert r.status_code == 200, r.text
        assert "gamma" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        r = client.post("/v1/completions", json={"model": "gamma", "prompt": PROMPT, "max_tokens": 6})
        assert r.json()["choices"][0]["text"] == world.text("gamma", world.ids(PROMPT), 6)
        error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "gamma",
                                                            "lora_path": str(world.paths["beta"])}), 400)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": str(world.paths["beta"])})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "b2", "prompt": PROMPT, "max_tokens": 6})
        assert r.json()["choices"][0]["text"] == world.text("beta", world.ids(PROMPT), 6)
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
        error_of(client.post("/v1/completions", json={"model": "gamma", "prompt": PROMPT}), 404)
        error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}), 404)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "alpha", "b2"]


def test_path_escapes_are_refused(world, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(world.paths["gamma"], outside / "evil")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "evil", root / "dirlink")  # a directory link leaving the root
    (root / "filelink").mkdir()  # an adapter dir whose weights file links outside
    shutil.copy(world.paths["gamma"] / "adapter_config.json", root / "filelink")
    os.symlink(outside / "evil" / "adapter_model.safetensors", root / "filelink" / "adapter_model.safetensors")
    with TestClient(world.app(names=(), roots=[root])) as client:
        for path in ("../outside/evil", str(outside / "evil"), "dirlink", "filelink", "/etc",
                     str(root / ".." / "outside" / "evil")):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
            assert "outside the adapter roots" in error_of(r, 403), path
        error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "missing"}), 404)
        for name in ("../evil", "a/b", ".."):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "dirlink"})
            assert error_of(r, 400)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE]
    with TestClient(world.app(names=(), roots=[])) as client:  # no roots: runtime loading is off
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": str(world.paths["gamma"])})
        assert "--adapter-root" in error_of(r, 403)


def test_corrupt_adapter_is_400_naming_the_file(world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world.paths["gamma"], bad)
    (bad / "adapter_config.json").write_text("{not json")
    with TestClient(world.app(names=(), roots=[tmp_path])) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "bad"})
        assert "adapter_config.json" in error_of(r, 400)


# ---------------------------------------------------------------------------------------------- real sockets


def test_concurrent_clients_over_loopback_get_their_adapters(world):
    models = [BASE, "alpha", "beta"] * 4
    prompts = ["the film was very", "hello there", "what is the plot", "select one from table"]

    async def ask(client, i):
        request = {"model": models[i], "prompt": prompts[i % 4], "max_tokens": 6 + i % 3}
        r = await client.post("/v1/completions", json=request)
        return request, r.json()

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(len(models))))

    with ThreadedServer(world.app()) as server:
        results = asyncio.run(main(server.url))
    for request, body in results:
        adapter = None if request["model"] == BASE else request["model"]
        expected = world.text(adapter, world.ids(request["prompt"]), request["max_tokens"])
        assert body["choices"][0]["text"] == expected, request


def test_unload_in_flight_is_409_and_disconnect_aborts(world):
    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            request = {"model": "alpha", "prompt": PROMPT, "max_tokens": 250, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=request) as r:
                lines = r.aiter_lines()  # kept referenced: a collected iterator may close the stream
                assert (await lines.__anext__()).startswith("data: ")  # generation is running
                busy = await client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
            for _ in range(200):  # the stream is closed: the engine drops the request
                stats = (await client.get("/metrics", params={"format": "json"})).json()
                if stats["requests_in_flight"] == 0 and stats.get("engine_running", 0) == 0:
                    break
                await asyncio.sleep(0.05)
            done = await client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
            return busy, stats, done

    with ThreadedServer(world.app(max_new_tokens=300)) as server:
        busy, stats, done = asyncio.run(main(server.url))
    assert "in flight" in error_of(busy, 409)
    assert stats["requests_in_flight"] == 0 and stats.get("engine_running", 0) == 0
    assert stats['finished_total{reason="abort"}'] == 1
    assert done.status_code == 200


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_builds_the_server_from_a_model_directory(world, tmp_path):
    base_dir = tmp_path / "tiny-llama"
    tiny_llama(world.vocab).save_pretrained(base_dir)
    world.tok.save_pretrained(base_dir)
    opts = ServeOptions(base=str(base_dir), adapters=[f"a1={world.paths['alpha']}", str(world.paths["beta"])],
                        adapter_root=[str(world.root)])
    with TestClient(build_app(opts)) as client:
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert names == ["tiny-llama", "a1", "beta"]
        r = client.post("/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": 5})
        assert r.json()["choices"][0]["text"] == world.text("alpha", world.ids(PROMPT), 5)


def test_cli_rejects_bad_adapter_specs(world, tmp_path, capsys):
    from peftkit.cli import build_parser, main
    from peftkit.errors import ConfigError

    args = build_parser().parse_args(["serve", "--adapters", "a=/x", "b=/y", "--adapter-root", "/r", "--port", "9"])
    assert (args.adapters, args.adapter_root, args.port) == (["a=/x", "b=/y"], ["/r"], 9)
    with pytest.raises(ConfigError, match="path separators"):
        parse_adapter_specs([f"a/../b={world.paths['alpha']}"])
    with pytest.raises(ConfigError, match="not a directory"):
        parse_adapter_specs([f"a={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="twice"):
        parse_adapter_specs([f"a={world.paths['alpha']}", f"a={world.paths['beta']}"])
    assert main(["serve", "--base", str(tmp_path), "--adapters", f"x={tmp_path / 'missing'}"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_adapter_broken_after_registration_fails_only_its_requests(world, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(world.paths["gamma"], broken)
    with TestClient(world.app(names=("alpha",), roots=[tmp_path])) as client:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": "broken"}).is_success
        tensors = load_file(broken / "adapter_model.safetensors")  # same header, non-finite data: found on first use
        save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
                  broken / "adapter_model.safetensors")
        r = client.post("/v1/completions", json={"model": "broken", "prompt": PROMPT, "max_tokens": 3})
        assert "adapter_model.safetensors" in error_of(r, 500)
        request = {"model": "broken", "prompt": PROMPT, "max_tokens": 3, "stream": True}
        with client.stream("POST", "/v1/completions", json=request) as s:
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]" and events[0]["error"]["code"] == 500
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 4})
        assert r.json()["choices"][0]["text"] == world.text("alpha", world.ids(PROMPT), 4)
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.slow
def test_server_load_benchmark_quick(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "serving_server.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "serving_server.py"), "--quick", "--out",
                           str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for phase in ("base", "mixed"):
        assert report[phase]["requests"] == report["settings"]["requests"]
        assert report[phase]["ok"] == report[phase]["requests"]  # every response came from its own adapter
    assert report["distinct_outputs"] > 0.5 and report["mixed_over_base"] > 0

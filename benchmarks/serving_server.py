"""Server load test: `peftkit serve` on loopback, concurrent clients bounded in count and time, and every
response checked against the adapter it asked for.

    .venv/bin/python benchmarks/serving_server.py --quick     # tiny model, seconds  -> --out or results/
    .venv/bin/python benchmarks/serving_server.py             # full run -> benchmarks/results/serving_server.json

Setup: a random transformers Llama (full: hidden 512, 4 layers, vocab 32000; quick: hidden 64, 2 layers, vocab
1000) saved as a model directory with a word-level tokenizer; N LoRA adapters (r=8, q/k/v/o, random weights so
every adapter changes the output) saved in the PEFT format. The server runs in a subprocess through the real
CLI (`python -m peftkit.cli serve --base DIR --adapters ... --adapter-root DIR`), pinned to `--threads` threads;
the last `runtime` adapters are loaded over HTTP (`POST /v1/load_lora_adapter`) before the load starts.

Phases (each: `clients` concurrent async httpx clients pull from one seeded request list until `requests` are
done or `seconds` have passed; every odd request streams):
  base   every request names the base model
  mixed  every request names one of the N adapters or the base, uniformly at random

Checks: each response's text must equal the greedy output of its own adapter computed beforehand through the
non-serving path (AdapterModel + load_adapter + set_active, KV cache, one request at a time). A response that
matches a different adapter's output counts as `wrong_adapter` (a routing bug); one that matches none counts as
`mismatch`. The sequential reference is timed too (peftkit `sequential` tokens/s), and so is peft doing the same
requests one at a time with `set_adapter` (peft has no server): the server's tokens/s are quoted against both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "serving_server.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FULL = dict(hidden=512, layers=4, heads=8, inter=1376, vocab=32000, adapters=32, runtime=8, clients=32,
            requests=384, seconds=120.0, max_tokens=32, prompts=8, words=(16, 64))
QUICK = dict(hidden=64, layers=2, heads=4, inter=176, vocab=1000, adapters=4, runtime=2, clients=4,
             requests=24, seconds=20.0, max_tokens=8, prompts=3, words=(4, 12))
SEED = 0


# --------------------------------------------------------------------------------------------------- setup
def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


def _model(s: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["heads"], intermediate_size=s["inter"], vocab_size=s["vocab"],
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # clear argmax margins: greedy outputs are stable across batch shapes
    return model


def prepare(work: Path, s: dict) -> tuple[Path, dict[str, Path]]:
    """Save the base model directory and the adapters; returns (base dir, {name: adapter dir})."""
    import torch

    from peftkit import AdapterModel, LoraConfig, save_adapter

    base = work / "base"
    _model(s).save_pretrained(base)
    _tokenizer(s["vocab"]).save_pretrained(base)
    paths = {}
    for i in range(s["adapters"]):
        am = AdapterModel(_model(s))
        am.add_adapter("x", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        g = torch.Generator().manual_seed(SEED + 100 + i)
        with torch.no_grad():
            for p in am.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        paths[f"a{i:03d}"] = save_adapter(am, work / "adapters" / f"a{i:03d}", "x")
    return base, paths


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past, token = o.past_key_values, int(o.logits[0, -1].argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out


def references(s: dict, paths: dict[str, Path], prompts: list[list[int]]) -> tuple[dict, float]:
    """{(adapter or None, prompt index): token ids} through the non-serving path, and its tokens/s."""
    from peftkit import AdapterModel, load_adapter

    am = AdapterModel(_model(s))
    for name, path in paths.items():
        load_adapter(am, path, name=name)
    out, start = {}, time.perf_counter()
    for name in [None, *paths]:
        for j, ids in enumerate(prompts):
            if name is None:
                with am.disabled():
                    out[(None, j)] = _greedy(am.model, ids, s["max_tokens"])
            else:
                am.set_active(name)
                out[(name, j)] = _greedy(am.model, ids, s["max_tokens"])
    return out, len(out) * s["max_tokens"] / (time.perf_counter() - start)


def peft_sequential(s: dict, paths: dict[str, Path], prompts: list[list[int]], refs: dict) -> dict:
    """peft serving the same requests one at a time (set_adapter per request): tokens/s and agreement."""
    try:
        from peft import PeftModel
    except ImportError:
        return {"skipped": "peft is not installed"}
    names = list(paths)
    model = PeftModel.from_pretrained(_model(s), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    agree, start = 0, time.perf_counter()
    for name in [None, *names]:
        for j, ids in enumerate(prompts):
            if name is None:
                with model.disable_adapter():
                    tokens = _greedy(model, ids, s["max_tokens"])
            else:
                model.set_adapter(name)
                tokens = _greedy(model, ids, s["max_tokens"])
            agree += tokens == refs[(name, j)]
    seconds = time.perf_counter() - start
    return {"tokens_per_s": len(refs) * s["max_tokens"] / seconds, "agrees_with_peftkit": agree / len(refs)}


# --------------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, startup: dict[str, Path], root: Path, s: dict, threads: int, port: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PEFTKIT_LOG_LEVEL="warning", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "peftkit.cli", "serve", "--base", str(base), "--served-model-name", "base",
           "--adapter-root", str(root), "--port", str(port), "--max-batch", str(s["clients"]),
           "--max-adapters-per-step", str(s["adapters"]), "--max-new-tokens", str(s["max_tokens"]),
           "--adapters", *[f"{n}={p}" for n, p in startup.items()]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def _wait_healthy(client, proc, timeout: float = 300.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        try:
            if (await client.get("/health")).status_code == 200:
                return time.perf_counter() - start
        except Exception:  # noqa: BLE001  (not listening yet)
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


async def _one(client, request: dict) -> dict:
    """Send one request; returns text, latency, time to first token (streamed requests) and status."""
    start, first, text = time.perf_counter(), None, ""
    if not request.get("stream"):
        r = await client.post("/v1/completions", json=request)
        ok = r.status_code == 200
        text = r.json()["choices"][0]["text"] if ok else r.text
        return {"ok": ok, "text": text, "latency": time.perf_counter() - start, "ttft": None}
    async with client.stream("POST", "/v1/completions", json=request) as r:
        ok = r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                ok = ok and "error" not in chunk
                first = first or time.perf_counter()
                text += "".join(c.get("text", "") for c in chunk.get("choices", []))
    ttft = None if first is None else first - start
    return {"ok": ok, "text": text, "latency": time.perf_counter() - start, "ttft": ttft}


async def _phase(client, plan: list[tuple[dict, int]], s: dict) -> tuple[list[tuple[dict, dict]], float]:
    """`clients` workers pull from `plan` until it is empty or the time budget is spent."""
    results, queue, deadline = [], list(reversed(plan)), time.perf_counter() + s["seconds"]

    async def worker():
        while queue and time.perf_counter() < deadline:
            body, j = queue.pop()
            results.append(((body, j), await _one(client, body)))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(s["clients"])))
    return results, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- checks
def _plan(s: dict, names: list[str], prompts: list[str], mixed: bool) -> list[tuple[dict, int]]:
    rng = random.Random(SEED + (1 if mixed else 0))
    plan = []
    for i in range(s["requests"]):
        j = rng.randrange(len(prompts))
        model = rng.choice(["base", *names]) if mixed else "base"
        body = {"model": model, "prompt": prompts[j], "max_tokens": s["max_tokens"], "ignore_eos": True,
                "stream": i % 2 == 1}
        plan.append((body, j))
    return plan


def _check(results: list, texts: dict, names: list[str]) -> dict[str, int]:
    """ok / wrong_adapter / mismatch / errors over (request, prompt index) -> result."""
    counts = dict(ok=0, wrong_adapter=0, mismatch=0, errors=0)
    for (body, j), res in results:
        adapter = None if body["model"] == "base" else body["model"]
        if not res["ok"]:
            counts["errors"] += 1
        elif res["text"] == texts[(adapter, j)]:
            counts["ok"] += 1
        elif any(res["text"] == texts[(a, j)] for a in [None, *names] if a != adapter):
            counts["wrong_adapter"] += 1
        else:
            counts["mismatch"] += 1
    return counts


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(results: list, seconds: float, texts: dict, names: list[str], s: dict) -> dict:
    lat = [r["latency"] for _, r in results]
    ttft = [r["ttft"] for _, r in results if r["ttft"] is not None]
    done = len(results)
    return {"requests": done, "seconds": seconds, "tokens_per_s": done * s["max_tokens"] / seconds,
            "requests_per_s": done / seconds, "latency_p50_s": _pct(lat, 0.5), "latency_p90_s": _pct(lat, 0.9),
            "latency_max_s": max(lat, default=None), "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
            **_check(results, texts, names)}


async def _drive(url: str, proc, s: dict, paths: dict[str, Path], runtime: list[str], prompts: list[str],
                 texts: dict) -> dict:
    import httpx

    names = list(paths)
    limits = httpx.Limits(max_connections=s["clients"] + 8, max_keepalive_connections=s["clients"] + 8)
    async with httpx.AsyncClient(base_url=url, timeout=s["seconds"] + 120, limits=limits) as client:
        out: dict = {"startup_s": await _wait_healthy(client, proc), "runtime_load_s": []}
        for name in runtime:
            start = time.perf_counter()
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
            if r.status_code != 200:
                raise RuntimeError(f"loading {name} failed: {r.text}")
            out["runtime_load_s"].append(time.perf_counter() - start)
        served = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert served == {"base", *names}, served
        warm = [{"model": n, "prompt": prompts[0], "max_tokens": 2} for n in ["base", *names][:s["clients"]]]
        await asyncio.gather(*(_one(client, body) for body in warm))  # warm-up: load adapters, first batches
        for phase in ("base", "mixed"):
            results, seconds = await _phase(client, _plan(s, names, prompts, phase == "mixed"), s)
            out[phase] = _summary(results, seconds, texts, names, s)
        out["server_metrics"] = (await client.get("/metrics", params={"format": "json"})).json()
    return out


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------- run
def run_server_load_test(quick: bool = False, threads: int = 1, with_peft: bool = True,
                         overrides: dict | None = None) -> dict:
    """The whole server section: setup, references, peft baseline, the server and both phases; a JSON dict."""
    import torch

    s = {**(QUICK if quick else FULL), **(overrides or {})}
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, paths = prepare(work, s)
        tok, rng = _tokenizer(s["vocab"]), random.Random(SEED)
        prompts = [" ".join(f"w{rng.randrange(s['vocab'] - 4)}" for _ in range(rng.randint(*s["words"])))
                   for _ in range(s["prompts"])]
        ids = [tok(p)["input_ids"] for p in prompts]
        refs, sequential_tps = references(s, paths, ids)
        texts = {key: tok.decode(t, skip_special_tokens=True) for key, t in refs.items()}
        distinct = statistics.mean(len({texts[(a, j)] for a in [None, *paths]}) / (len(paths) + 1)
                                   for j in range(len(prompts)))
        peft = peft_sequential(s, paths, ids, refs) if with_peft else {"skipped": "--no-peft"}
        names = list(paths)
        runtime, startup = names[len(names) - s["runtime"]:], names[:len(names) - s["runtime"]]
        port = _free_port()
        proc = start_server(base, {n: paths[n] for n in startup}, work / "adapters", s, threads, port)
        try:
            report = asyncio.run(_drive(f"http://127.0.0.1:{port}", proc, s, paths, runtime, prompts, texts))
        finally:
            _stop(proc)
    report.update(settings=s, threads=threads, quick=quick, distinct_outputs=distinct,
                  sequential_peftkit_tokens_per_s=sequential_tps, peft_sequential=peft)
    report["mixed_over_base"] = report["mixed"]["tokens_per_s"] / report["base"]["tokens_per_s"]
    report["mixed_over_sequential_peftkit"] = report["mixed"]["tokens_per_s"] / sequential_tps
    if "tokens_per_s" in peft:
        report["mixed_over_peft_sequential"] = report["mixed"]["tokens_per_s"] / peft["tokens_per_s"]
    return report


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def format_report(r: dict) -> str:
    s = r["settings"]
    lines = [f"server load test{' (QUICK)' if r['quick'] else ''}: {s['adapters']} adapters ({s['runtime']} loaded "
             f"at runtime), {s['clients']} concurrent clients, {s['max_tokens']} tokens/request, {r['threads']} "
             f"thread(s); startup {r['startup_s']:.1f} s; distinct outputs per prompt {r['distinct_outputs']:.0%}"]
    cols = ["requests", "seconds", "tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p90_s",
            "ttft_p50_s", "ok", "wrong_adapter", "mismatch", "errors"]
    lines.append("phase  " + " ".join(f"{c:>14s}" for c in cols))
    for phase in ("base", "mixed"):
        lines.append(f"{phase:6s} " + " ".join(f"{_fmt(r[phase][c]):>14s}" for c in cols))
    peft = r["peft_sequential"].get("tokens_per_s")
    lines.append(f"one request at a time: peftkit {r['sequential_peftkit_tokens_per_s']:.1f} tok/s, peft "
                 f"{_fmt(peft)} tok/s; server mixed/base {r['mixed_over_base']:.2f}x, mixed/peftkit-sequential "
                 f"{r['mixed_over_sequential_peftkit']:.2f}x, "
                 f"mixed/peft-sequential {_fmt(r.get('mixed_over_peft_sequential'))}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and load (smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the server and the baselines")
    p.add_argument("--no-peft", action="store_true", help="skip the peft sequential baseline")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    report = run_server_load_test(args.quick, args.threads, not args.no_peft)
    import torch

    import peftkit

    report["env"] = {"python": platform.python_version(), "torch": torch.__version__, "peftkit": peftkit.__version__,
                     "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    print(format_report(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    bad = sum(report[ph][k] for ph in ("base", "mixed") for k in ("wrong_adapter", "errors"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

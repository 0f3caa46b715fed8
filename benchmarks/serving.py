"""Serving benchmark: peftkit's batched multi-adapter serving vs peft, side by side in one run, CPU, 1 thread.

    .venv/bin/python benchmarks/serving.py                 # full run -> benchmarks/results/serving.json
    .venv/bin/python benchmarks/serving.py --quick         # tiny sizes, smoke test
    .venv/bin/python benchmarks/serving.py --sections op,registration

Sections (each returns a dict into the JSON and prints a table):
  op            one projection (hidden x hidden), T tokens (one per request, as in decode) in {16, 64, 256, 1024},
                adapters per Punica workload (Distinct: one per token; Uniform / Zipf-1.5 over 8; Identical: one),
                LoRA r=16. Time of base matmul + adapter op, as a ratio to the base matmul alone, for peftkit's
                segment and gather back ends and for peft's LoRA layer with `adapter_names=` (its mixed batch).
                The routing plan (sort + segments) is built once per forward and shared by every layer, so it
                is timed apart (plan_s) rather than charged to each layer. Base and back ends are timed
                interleaved round by round (best of 5 calls each); a ratio is the median over rounds.
  e2e           the engine on a tiny Llama: 32 requests (prompt 16, 32 new tokens, greedy), N distinct adapters in
                {1, 8, 32}; tokens/s and the ratio to the same engine serving the base model only (runs
                interleaved round by round, ratios paired per round). peft side by side:
                `generate(adapter_names=...)` on the whole batch, and merge-and-swap (per adapter: merge,
                generate its requests, unmerge).
  registration  registering 10 / 100 / 1000 adapter directories: peftkit's lazy AdapterStore vs peft's
                `load_adapter` (peft capped at 100 in full runs, 10 with --quick).
  server        `peftkit serve` in a subprocess on loopback, concurrent clients bounded in count and time, every
                response checked against its adapter's greedy output; peft one request at a time side by side
                (details: benchmarks/serving_server.py, which also runs alone).

Targets (issue 6): e2e >= 0.8x base at 32 distinct adapters; op <= 1.3x base at <= 8 adapters, <= 2x at 256;
1000 adapters registered in < 5 s. Medians with min and max over repeats.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "serving.json"
FULL = dict(hidden=512, layers=4, heads=8, inter=1376, vocab=32000, tokens=(16, 64, 256, 1024), n_adapters=(1, 8, 32),
            requests=32, prompt=16, new=32, registrations=(10, 100, 1000), peft_reg_max=100, repeats=7)
QUICK = dict(hidden=64, layers=2, heads=4, inter=176, vocab=1000, tokens=(16, 64), n_adapters=(1, 8),
             requests=8, prompt=8, new=4, registrations=(10, 100), peft_reg_max=10, repeats=3)
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# --- op level -------------------------------------------------------------------------------------------------
def _peft_layer(hidden: int, n: int):
    import peft

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(hidden, hidden, bias=False))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"],
                                                    init_lora_weights=False), adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"],
                                                init_lora_weights=False))
    return pm.base_model.model.proj


def op_section(sizes: dict, repeats: int) -> dict:
    from peftkit.core.adapter import LowRank
    from peftkit.serve.ops import Slots

    h, out = sizes["hidden"], {}
    g = torch.Generator().manual_seed(0)
    for tokens in sizes["tokens"]:
        lows = [LowRank(torch.randn(RANK, h, generator=g) / h ** .5, torch.randn(h, RANK, generator=g) / RANK ** .5,
                        2.0) for _ in range(tokens)]  # distinct needs one adapter per token
        point = _OpPoint(torch.nn.Linear(h, h, bias=False), Slots([{"p": low} for low in lows]),
                         torch.randn(tokens, h, generator=g), repeats)
        point.peft_layer = _peft_layer(h, min(tokens, PEFT_OP_MAX_ADAPTERS))
        for workload, row in point.run(g).items():
            out[f"{workload}/{tokens}"] = row
    return out


PEFT_OP_MAX_ADAPTERS = 256  # peft's layer holds one module pair per adapter; more makes setup take minutes


class _OpPoint:
    """One (layer, tokens) point: base matmul time, then each workload's ratio for each back end and peft."""

    def __init__(self, layer, slots, x, repeats: int) -> None:
        from peftkit.core.layers import ops_for

        self.layer, self.slots, self.x, self.repeats, self.ops = layer, slots, x, repeats, ops_for(layer)
        self.peft_layer = None

    def run(self, g: torch.Generator) -> dict:
        from peftkit.serve.workloads import WORKLOADS, sample_adapters

        tokens, out = self.x.shape[0], {}
        with torch.inference_mode():
            self.base = _timed(lambda: self.layer(self.x), self.repeats)["median_s"]
            for workload in WORKLOADS:
                rows = sorted(sample_adapters(workload, tokens, tokens if workload == "distinct" else 8, g))
                out[workload] = self._row(rows)
        return out

    def _row(self, rows: list[int]) -> dict:
        from peftkit.serve.ops import RoutingPlan, adapter_op

        plan = RoutingPlan(torch.tensor(rows))
        plan_s = _timed(lambda: RoutingPlan(plan.slots).segments(), self.repeats)["median_s"]
        row = {"adapters": len(set(rows)), "base_s": self.base, "plan_s": plan_s}  # plan: once per forward
        fns = {"base": lambda: self.layer(self.x)}
        for backend in OP_BACKENDS:
            fns[backend] = (lambda b=backend: adapter_op(b, self.ops, "p", self.x, self.layer(self.x), plan,
                                                          self.slots))
        if max(rows) < len(self.peft_layer.lora_A):
            names = [f"a{r}" for r in rows]
            fns["peft"] = lambda: self.peft_layer(self.x, adapter_names=names)
        row |= _paired_ratios(fns, self.repeats)
        row["best"] = min(row[b] for b in OP_BACKENDS)
        return row


OP_BACKENDS = ("segment", "gather", "auto")


def _paired_ratios(fns: dict, repeats: int) -> dict:
    """Each fn's time over fns["base"], timed interleaved round by round (a loaded machine drifts): the median
    over rounds of each round's ratio. Each round times every fn 5 times back to back and keeps the best."""
    for fn in fns.values():
        fn()  # warm-up (plans, stacks)
    ratios: dict[str, list[float]] = {name: [] for name in fns if name != "base"}
    for _ in range(repeats):
        best = {}
        for name, fn in fns.items():
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        for name in ratios:
            ratios[name].append(best[name] / best["base"])
    return {name: statistics.median(r) for name, r in ratios.items()}


def op_table(res: dict) -> str:
    head = "".join(f"{b:>9}" for b in OP_BACKENDS)
    lines = [f"{'workload/tokens':<18}{'adapters':>9}{head}{'best':>7}{'peft':>7}  (x base)"]
    for key, r in res.items():
        peft = f"{r['peft']:.2f}" if "peft" in r else "-"
        cells = "".join(f"{r[b]:>9.2f}" for b in OP_BACKENDS)
        lines.append(f"{key:<18}{r['adapters']:>9}{cells}{r['best']:>7.2f}{peft:>7}")
    return "\n".join(lines)


# --- end to end -----------------------------------------------------------------------------------------------
def _llama(sizes: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
                      num_attention_heads=sizes["heads"], num_key_value_heads=sizes["heads"],
                      intermediate_size=sizes["inter"], vocab_size=sizes["vocab"], max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _save_adapters(sizes: dict, root: Path, n: int) -> list[Path]:
    from peftkit import AdapterModel, LoraConfig, save_adapter

    am = AdapterModel(_llama(sizes))
    paths = []
    for i in range(n):
        am.add_adapter(f"a{i}", LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                           init_lora_weights=False))
        paths.append(save_adapter(am, root / f"a{i}", f"a{i}"))
        am.delete_adapter(f"a{i}")
    return paths


def _engine_run(sizes, paths, names, prompts) -> float:
    from peftkit.serve import engine as eng
    from peftkit.serve.store import AdapterStore

    store = AdapterStore()
    engine = eng.Engine(_llama(sizes), store, max_batch=len(prompts), max_adapters_per_step=max(len(paths), 1))
    for i, p in enumerate(paths):
        store.register(f"a{i}", p)
    for i, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
        engine.add_request(eng.GenerationRequest(str(i), prompt, name, sizes["new"]))
    engine.step()  # adapters load and the prompts prefill outside the timed part
    t0, tokens = time.perf_counter(), 0
    while engine.has_work():
        tokens += sum(ev.token_id is not None for ev in engine.step())
    return tokens / (time.perf_counter() - t0)


def _peft_runs(sizes, paths, names, prompts) -> dict:
    import peft

    pm = peft.PeftModel.from_pretrained(_llama(sizes), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")
    ids = torch.tensor(prompts)
    new = sizes["new"]
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        pm.generate(input_ids=ids, adapter_names=list(names), **kw)
        mixed = len(prompts) * new / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for name in sorted(set(names)):
            rows = [i for i, n in enumerate(names) if n == name]
            pm.set_adapter(name)
            pm.base_model.merge_adapter()
            pm.generate(input_ids=ids[rows], **kw)
            pm.base_model.unmerge_adapter()
        swap = len(prompts) * new / (time.perf_counter() - t0)
    return {"peft_mixed_tok_s": mixed, "peft_merge_swap_tok_s": swap}


def e2e_section(sizes: dict, repeats: int) -> dict:
    """Rounds interleave the base run and every adapter count (a loaded machine drifts): tok/s are medians over
    rounds, x base is the median over rounds of each round's ratio to that round's base run."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, sizes["vocab"], (sizes["requests"], sizes["prompt"]), generator=g).tolist()
    runs: dict = {"base": [], **{n: [] for n in sizes["n_adapters"]}}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _save_adapters(sizes, Path(tmp), max(sizes["n_adapters"]))
        for _ in range(max(1, repeats // 2)):
            runs["base"].append(_engine_run(sizes, [], [None] * len(prompts), prompts))
            for n in sizes["n_adapters"]:
                runs[n].append(_engine_run(sizes, paths[:n], [f"a{i % n}" for i in range(len(prompts))], prompts))
        base = statistics.median(runs["base"])
        for n in sizes["n_adapters"]:
            names = [f"a{i % n}" for i in range(len(prompts))]
            ratios = [t / b for t, b in zip(runs[n], runs["base"], strict=True)]
            row = {"base_tok_s": base, "peftkit_tok_s": statistics.median(runs[n]),
                   "peftkit_x_base": statistics.median(ratios), "peftkit_x_base_min_max": [min(ratios), max(ratios)]}
            row |= _peft_runs(sizes, paths[:n], names, prompts)
            row["peft_mixed_x_base"] = row["peft_mixed_tok_s"] / base
            out[f"{n}"] = row
    return out


def e2e_table(res: dict) -> str:
    lines = [f"{'adapters':>8}{'base tok/s':>12}{'peftkit':>10}{'x base':>8}{'peft mixed':>12}{'merge-swap':>12}"]
    for n, r in res.items():
        lines.append(f"{n:>8}{r['base_tok_s']:>12.1f}{r['peftkit_tok_s']:>10.1f}{r['peftkit_x_base']:>8.2f}"
                     f"{r['peft_mixed_tok_s']:>12.1f}{r['peft_merge_swap_tok_s']:>12.1f}")
    return "\n".join(lines)


# --- registration ---------------------------------------------------------------------------------------------
def registration_section(sizes: dict, repeats: int) -> dict:
    import shutil

    import peft

    from peftkit.serve.model import ServingModel
    from peftkit.serve.store import AdapterStore

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = _save_adapters(sizes, Path(tmp), 1)[0]
        dirs = []
        for i in range(max(sizes["registrations"])):
            dirs.append(Path(tmp) / f"r{i}")
            shutil.copytree(src, dirs[-1])
        for n in sizes["registrations"]:
            store = AdapterStore(check=ServingModel(_llama(sizes)).check)
            t0 = time.perf_counter()
            for i in range(n):
                store.register(f"r{i}", dirs[i])
            row = {"peftkit_s": time.perf_counter() - t0}
            if n <= sizes["peft_reg_max"]:
                pm = peft.PeftModel.from_pretrained(_llama(sizes), str(dirs[0]), adapter_name="r0")
                t0 = time.perf_counter()
                for i in range(1, n):
                    pm.load_adapter(str(dirs[i]), adapter_name=f"r{i}")
                row["peft_s"] = time.perf_counter() - t0
            out[str(n)] = row
    return out


def registration_table(res: dict) -> str:
    lines = [f"{'adapters':>8}{'peftkit s':>11}{'peft s':>9}"]
    for n, r in res.items():
        peft = f"{r['peft_s']:.2f}" if "peft_s" in r else "-"
        lines.append(f"{n:>8}{r['peftkit_s']:>11.3f}{peft:>9}")
    return "\n".join(lines)


SECTIONS = {"op": (op_section, op_table), "e2e": (e2e_section, e2e_table),
            "registration": (registration_section, registration_table)}


# --- server (added by the HTTP server's load test; the work lives in serving_server.py) --------------------------
def server_section(sizes: dict, repeats: int) -> dict:
    """`peftkit serve` on loopback: concurrent clients, every response checked against its own adapter."""
    import sys

    sys.path.insert(0, str(HERE))
    import serving_server

    return serving_server.run_server_load_test(quick=sizes is QUICK, threads=1)


def server_table(res: dict) -> str:
    import serving_server

    return serving_server.format_report(res)


SECTIONS["server"] = (server_section, server_table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    report = {"quick": args.quick, "sizes": sizes, "env": {"torch": torch.__version__, "threads": 1}}
    for name in args.sections.split(","):
        fn, table = SECTIONS[name]
        t0 = time.perf_counter()
        report[name] = fn(sizes, sizes["repeats"])
        print(f"\n== {name} ({time.perf_counter() - t0:.1f} s)\n{table(report[name])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step benchmark: peftkit vs peft (LoRA, DoRA) against a frozen-model floor, on CPU, 1 thread.

    .venv/bin/python benchmarks/train_step.py                     # full run -> benchmarks/results/train_step.json
    .venv/bin/python benchmarks/train_step.py --quick --steps 2   # tiny model, smoke test

Model: a randomly initialised transformers Llama (hidden 512, 4 layers, 8 heads, vocab 32000, fixed seed),
batch 4 x 128 tokens, causal-LM loss with labels=input_ids, AdamW over the trainable parameters.
A timed step is zero_grad + forward + backward + optimizer.step.

Cases (each in its own worker process, so peak RSS is per case):
  floor         frozen model, no adapter, no weight gradients. The outputs of the seven projections are made
                to require grad where nothing upstream does (layer 0 only), so backward walks exactly the base
                graph the adapter cases walk, and computes nothing else. No optimizer (no parameters).
  floor-embeds  (optional) frozen model, inputs_embeds leaf requiring grad: backward runs down to the
                embeddings, which adds layer 0's input-gradient matmuls the adapter cases never compute.
  peft-lora / peftkit-lora   r=16, alpha=32, dropout 0, q/k/v/o/gate/up/down projections.
  peft-dora / peftkit-dora   the same with use_dora=True.

The workers start together, then the parent interleaves them: warm-up for each, then for every timed step one
step of each case (rotating the order), so slow drift of the machine hits all cases alike. Only one worker
computes at any time; the others wait on a pipe.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before torch is imported (workers import it; the parent never does)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "train_step.json"
DEFAULT_CASES = ("floor", "peft-lora", "peftkit-lora", "peft-dora", "peftkit-dora")
ALL_CASES = (*DEFAULT_CASES, "floor-embeds")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FULL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
            intermediate_size=1376, vocab_size=32000, batch=4, seq=128)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=176, vocab_size=1000, batch=2, seq=16)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
SEED = 0


# --------------------------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    """Current resident set size (MB), from /proc where available."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def _minflt() -> int:
    """Minor page faults so far: fresh memory the allocator had to get from the kernel (and zero)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(case: str, sizes: dict):
    """(model, step_fn) for one case; step_fn() runs one full training step and returns the loss."""
    # Both libraries are imported in every worker so that the import footprint (part of peak RSS) is the same.
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit

    torch.manual_seed(SEED)
    config = LlamaConfig(
        hidden_size=sizes["hidden_size"], num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"], num_key_value_heads=sizes["num_key_value_heads"],
        intermediate_size=sizes["intermediate_size"], vocab_size=sizes["vocab_size"],
        max_position_embeddings=max(256, sizes["seq"]), attention_dropout=0.0, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).float()
    base.requires_grad_(False)
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, sizes["vocab_size"], (sizes["batch"], sizes["seq"]), generator=gen)

    if case.startswith("floor"):
        model = base
        if case == "floor":
            def make_leaf(_module, _inputs, out):
                if not out.requires_grad:
                    out.requires_grad_(True)  # a leaf: backward stops here, as at layer 0's LoRA
                return out

            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1] in TARGETS:
                    module.register_forward_hook(make_leaf)
            inputs = dict(input_ids=ids)
        else:
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            inputs = dict(inputs_embeds=embeds)
        optimizer = None
    else:
        lib_name, method = case.split("-")
        lib = peft if lib_name == "peft" else peftkit
        cfg = lib.LoraConfig(target_modules=list(TARGETS), use_dora=method == "dora", **LORA)
        model = lib.get_peft_model(base, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        inputs = dict(input_ids=ids)
    model.train()

    def step() -> float:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        elif "inputs_embeds" in inputs:
            inputs["inputs_embeds"].grad = None
        loss = model(**inputs, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = dict(torch=torch.__version__, peft=peft.__version__, peftkit=peftkit.__version__,
                transformers=__import__("transformers").__version__, python=platform.python_version(),
                platform=platform.platform(), cpu=_cpu_name(), threads=torch.get_num_threads(),
                interop_threads=torch.get_num_interop_threads())
    return step, trainable, info


def worker(case: str, quick: bool) -> None:
    """Serve one case over stdin/stdout (JSON lines): 'warmup N', 'step', 'done'."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the protocol
    import torch

    torch.set_num_threads(1)
    sizes = QUICK if quick else FULL

    def send(**msg) -> None:
        proto.write(json.dumps(msg) + "\n")

    step, trainable, info = _build(case, sizes)
    rss_built = _rss_mb()
    send(ready=True, trainable_params=trainable, rss_after_build_mb=rss_built, env=info)
    losses: list[float] = []
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "warmup":
            for _ in range(int(cmd[1])):
                losses.append(step())
            send(ok=True)
        elif cmd[0] == "step":
            f0, c0, t0 = _minflt(), time.process_time(), time.perf_counter()
            loss = step()
            t1, c1, f1 = time.perf_counter(), time.process_time(), _minflt()
            send(t=t1 - t0, cpu=c1 - c0, faults=f1 - f0, loss=loss)
            losses.append(loss)
        elif cmd[0] == "done":
            send(peak_rss_mb=_peak_rss_mb(), rss_after_build_mb=rss_built, first_loss=losses[0] if losses else None,
                 last_loss=losses[-1] if losses else None)
            return


# --------------------------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------------------------
def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# glibc keeps freed memory instead of returning it to the kernel (and re-faulting it on the next allocation).
# Only tensors above 32 MiB (the largest allowed mmap threshold: logits and their gradients) are still mmapped.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


class Worker:
    def __init__(self, case: str, quick: bool, tuned_malloc: bool = False) -> None:
        self.case = case
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case] + (["--quick"] if quick else [])
        env = dict(os.environ, **TUNED_MALLOC) if tuned_malloc else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env)

    def ask(self, cmd: str | None = None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"worker {self.case!r} exited with {self.proc.returncode}:\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run(cases: list[str], steps: int, warmup: int, quick: bool, tuned_malloc: bool = False) -> dict:
    load_start = _loadavg()
    workers = [Worker(c, quick, tuned_malloc) for c in cases]  # start together: imports and model builds overlap
    try:
        ready = {w.case: w.ask() for w in workers}
        for w in workers:
            w.ask(f"warmup {warmup}")
        times: dict[str, list[float]] = {c: [] for c in cases}
        cpu: dict[str, list[float]] = {c: [] for c in cases}
        faults: dict[str, list[int]] = {c: [] for c in cases}
        for i in range(steps):
            k = i % len(workers)
            for w in workers[k:] + workers[:k]:  # rotate who goes first
                reply = w.ask("step")
                times[w.case].append(reply["t"])
                cpu[w.case].append(reply["cpu"])
                faults[w.case].append(reply["faults"])
        final = {w.case: w.ask("done") for w in workers}
    finally:
        for w in workers:
            w.close()

    env = dict(next(iter(ready.values()))["env"])
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    env["cpu_count"] = os.cpu_count()
    env["malloc"] = TUNED_MALLOC if tuned_malloc else "default"
    env["loadavg_start"], env["loadavg_end"] = load_start, _loadavg()  # other load on the machine skews timings
    sizes = QUICK if quick else FULL
    results = {}
    for c in cases:
        t = times[c]
        results[c] = dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), steps=len(t),
                          cpu_median_s=statistics.median(cpu[c]), cpu_min_s=min(cpu[c]), cpu_max_s=max(cpu[c]),
                          page_faults_per_step=statistics.median(faults[c]),
                          peak_rss_mb=round(final[c]["peak_rss_mb"], 1),
                          rss_after_build_mb=round(final[c]["rss_after_build_mb"], 1),
                          trainable_params=ready[c]["trainable_params"],
                          first_loss=final[c]["first_loss"], last_loss=final[c]["last_loss"], times_s=t,
                          cpu_times_s=cpu[c])
    floor = results.get("floor")
    for r in results.values():
        # x_floor: ratio of medians (the headline). x_floor_paired: median over rounds of this case's time over
        # the floor's time in the same round (robust to load drift). x_floor_min: ratio of the fastest steps.
        r["x_floor"] = r["median_s"] / floor["median_s"] if floor else None
        r["x_floor_paired"] = (statistics.median([t / f for t, f in zip(r["times_s"], floor["times_s"], strict=True)])
                               if floor else None)
        r["x_floor_min"] = r["min_s"] / floor["min_s"] if floor else None
        r["x_floor_cpu"] = r["cpu_median_s"] / floor["cpu_median_s"] if floor else None  # process CPU time
    ratios = {}
    for method in ("lora", "dora"):
        a, b = results.get(f"peftkit-{method}"), results.get(f"peft-{method}")
        if a and b:
            ratios[method] = dict(median=a["median_s"] / b["median_s"],
                                  cpu_median=a["cpu_median_s"] / b["cpu_median_s"],
                                  peak_rss=a["peak_rss_mb"] / b["peak_rss_mb"])
    return dict(benchmark="train_step", quick=quick, warmup=warmup,
                model=dict(arch="LlamaForCausalLM", dtype="float32", seed=SEED,
                           **{k: v for k, v in sizes.items() if k not in ("batch", "seq")}),
                batch=dict(batch_size=sizes["batch"], seq_len=sizes["seq"]),
                adapter=dict(target_modules=list(TARGETS), **LORA), optimizer="AdamW(lr=1e-4)",
                env=env, cases=results, peftkit_over_peft=ratios,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def table(report: dict) -> str:
    def x(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [f"{'case':<14}{'median s':>10}{'min s':>9}{'max s':>9}{'x floor':>9}{'paired':>8}{'x min':>7}{'x cpu':>7}"
            f"{'peak RSS MB':>13}{'+RSS step':>11}{'faults/step':>13}{'trainable':>11}"]
    for case, r in report["cases"].items():
        rows.append(f"{case:<14}{r['median_s']:>10.4f}{r['min_s']:>9.4f}{r['max_s']:>9.4f}{x(r['x_floor']):>9}"
                    f"{x(r['x_floor_paired']):>8}{x(r['x_floor_min']):>7}{x(r['x_floor_cpu']):>7}"
                    f"{r['peak_rss_mb']:>13.1f}{r['peak_rss_mb'] - r['rss_after_build_mb']:>11.1f}"
                    f"{r['page_faults_per_step']:>13,.0f}{r['trainable_params']:>11,}")
    for method, q in report["peftkit_over_peft"].items():
        rows.append(f"peftkit/peft {method}: median {q['median']:.3f}x, CPU-time median {q['cpu_median']:.3f}x, "
                    f"peak RSS {q['peak_rss']:.3f}x")
    c = report["cases"]
    checks = []
    if "floor" in c and "peftkit-lora" in c:
        checks.append(("peftkit LoRA <= 1.06x floor", c["peftkit-lora"]["x_floor"] <= 1.06))
    if "floor" in c and "peftkit-dora" in c:
        checks.append(("peftkit DoRA <= 1.10x floor", c["peftkit-dora"]["x_floor"] <= 1.10))
    if "peftkit-lora" in c and "peftkit-dora" in c:
        checks.append(("peftkit DoRA peak RSS <= LoRA + 5%",
                       c["peftkit-dora"]["peak_rss_mb"] <= 1.05 * c["peftkit-lora"]["peak_rss_mb"]))
    rows += [f"target: {name}: {'met' if ok else 'NOT met'}" for name, ok in checks]
    e = report["env"]
    load = e.get("loadavg_start") or [0.0]
    if load[0] >= max(1.5, 0.5 * (e.get("cpu_count") or 1)):
        rows.append(f"WARNING: load average {load[0]} on {e.get('cpu_count')} CPUs before the run: wall-clock "
                    "medians are noisy; prefer the paired and CPU-time ratios")
    rows.append("x floor = median / floor median; paired = median of per-round ratios; x min = min / floor min;\n"
                "x cpu = median process CPU time / floor's (least affected by other load on the machine); "
                "faults/step = minor page faults")
    rows.append(f"torch {e['torch']}, peft {e['peft']}, peftkit {e['peftkit']}, {e['cpu']}, "
                f"{e['threads']} thread(s); {report['cases'][next(iter(c))]['steps']} timed steps; "
                f"load average {e['loadavg_start']} -> {e['loadavg_end']}; malloc {e['malloc']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per case (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny model and batch (CI smoke test)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated subset of {','.join(ALL_CASES)} (default: {','.join(DEFAULT_CASES)})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output path (default {DEFAULT_OUT})")
    p.add_argument("--tuned-malloc", action="store_true",
                   help="run the workers with glibc's heap trimming off (MALLOC_TRIM_THRESHOLD_), so freed activations "
                        "are reused instead of being page-faulted in again; separates allocator cost from compute")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown or not cases:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(ALL_CASES)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    report = run(cases, args.steps, args.warmup, args.quick, args.tuned_malloc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

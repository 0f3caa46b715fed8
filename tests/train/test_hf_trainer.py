"""`transformers.Trainer` trains a peftkit `PeftModel` (the peft facade) like it trains a peft one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model

from .loop_helpers import BATCH, SEQ, VOCAB, one_thread, tiny_base  # noqa: F401

transformers = pytest.importorskip("transformers")


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)  # (N, T)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def _trainer(model: PeftModel, out: Path, **overrides) -> transformers.Trainer:
    args = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=BATCH, report_to=[], save_strategy="no",
                use_cpu=True, learning_rate=1e-2, disable_tqdm=True)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**(args | overrides)),
                                train_dataset=_dataset())


def _model(base=None) -> PeftModel:
    return get_peft_model(base or tiny_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))


def _expect_failure(trainer: transformers.Trainer, message: str) -> None:
    """Train; the known failure must be the documented one (anything else fails the xfail)."""
    try:
        trainer.train()
    except (ValueError, RuntimeError) as e:
        assert message in str(e), e
        raise


def test_trainer_trains_only_the_adapter_and_the_result_reloads(tmp_path: Path) -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    # remove_unused_columns=False: see test_trainer_default_arguments
    _trainer(model, tmp_path / "run", remove_unused_columns=False).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == adapter, "exactly the adapter tensors train (B starts at zero, so A moves from step 2)"

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "adapter")
    ids = _dataset(2)[0]["input_ids"][None]  # (1, T)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        assert not torch.equal(base_logits, reloaded(input_ids=ids).logits)


def test_trainer_with_gradient_checkpointing(tmp_path: Path) -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _trainer(model, tmp_path, remove_unused_columns=False, gradient_checkpointing=True).train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_trainer_default_arguments(tmp_path: Path) -> None:
    """Default TrainingArguments (remove_unused_columns=True): the facade's forward advertises the base model's
    parameters, so the Trainer keeps input_ids/attention_mask/labels."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _trainer(model, tmp_path).train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.xfail(raises=RuntimeError, strict=True, reason=(
    "Trainer._save calls save_pretrained only on PreTrainedModel or peft's PeftModel; for anything else it writes "
    "model.state_dict() with safetensors.save_file, which refuses tied weights (embed_tokens / lm_head, as in "
    "SmolLM2) and would otherwise save the whole base. Use save_strategy='no' + model.save_pretrained"))
def test_trainer_checkpoint_with_tied_embeddings(tmp_path: Path) -> None:
    base = tiny_base()
    base.lm_head.weight = base.model.embed_tokens.weight  # tie_word_embeddings
    trainer = _trainer(_model(base), tmp_path, remove_unused_columns=False, max_steps=1, save_strategy="steps",
                       save_steps=1)
    _expect_failure(trainer, "share memory")

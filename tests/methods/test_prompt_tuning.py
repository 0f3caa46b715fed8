"""Prompt tuning: inputs rewritten with a soft prefix, only P trains, equal to peft's forward with the same P."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import AdapterModel, ConfigError, UnsupportedLayerError
from peftkit.methods.prompt_tuning import INPUT_EMBEDDINGS, PromptTuningAdapter, PromptTuningConfig

from ._helpers import SEQ, VOCAB, tiny_llama, token_ids

pytest.importorskip("transformers")

N = 3


def _wrapped(n: int = N, **fields) -> AdapterModel:
    model = AdapterModel(tiny_llama())
    model.add_adapter("default", PromptTuningConfig(num_virtual_tokens=n, **fields))
    return model


def _adapter(model: AdapterModel, name: str = "default") -> PromptTuningAdapter:
    return model.model.get_submodule("model.embed_tokens").adapters[name]


def _batch() -> dict[str, torch.Tensor]:
    ids = token_ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on row 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_default_target_is_the_input_embedding() -> None:
    model = _wrapped()
    assert PromptTuningConfig().target_modules == INPUT_EMBEDDINGS
    assert [p for p, _ in model.hosts()] == ["model.embed_tokens"]
    assert _adapter(model).prompt_embeddings.shape == (N, 64)


def test_only_prompt_has_grad() -> None:
    model = _wrapped()
    p = _adapter(model).prompt_embeddings
    assert [q for q in model.parameters() if q.requires_grad] == [p]
    model(**_batch()).loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(q.grad is None for q in model.parameters() if q is not p)


def test_zero_tokens_identical_to_base() -> None:
    base = tiny_llama()
    with torch.no_grad():
        expected = base(**_batch())
    model = _wrapped(n=0)
    with torch.no_grad():
        out = model(**_batch())
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.loss, expected.loss)


def test_inputs_are_extended_mask_labels_positions() -> None:
    adapter = _adapter(_wrapped())
    batch = _batch() | {"position_ids": torch.arange(SEQ).expand(2, SEQ), "token_type_ids": torch.ones(2, SEQ).long()}
    out = adapter.transform_inputs(batch)
    assert "input_ids" not in out and out["inputs_embeds"].shape == (2, SEQ + N, 64)
    torch.testing.assert_close(out["inputs_embeds"][:, :N], adapter.prompt_embeddings.detach().expand(2, N, 64))
    torch.testing.assert_close(out["inputs_embeds"][:, N:], adapter.ops.module(batch["input_ids"]))
    assert out["attention_mask"].shape == (2, SEQ + N)
    mask = out["attention_mask"]
    assert mask[:, :N].eq(1).all() and torch.equal(mask[:, N:], batch["attention_mask"])
    assert out["labels"][:, :N].eq(-100).all() and torch.equal(out["labels"][:, N:], batch["labels"])
    assert torch.equal(out["position_ids"], torch.arange(SEQ + N).expand(2, SEQ + N))
    assert out["token_type_ids"][:, :N].eq(0).all() and out["token_type_ids"][:, N:].eq(1).all()
    assert torch.equal(batch["attention_mask"], _batch()["attention_mask"])  # the caller's dict is not changed


def test_loss_positions_are_the_real_tokens() -> None:
    """The loss is next-token CE over the T real tokens, the first one predicted from the last soft token."""
    model = _wrapped()
    batch = {k: v for k, v in _batch().items() if k != "attention_mask"}
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, SEQ + N, VOCAB)
    pred = out.logits[:, N - 1:N + SEQ - 1]  # (B, T, V): position i predicts token i + 1
    expected = F.cross_entropy(pred.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_forward_equals_peft() -> None:
    peft = pytest.importorskip("peft")
    model = _wrapped()
    with torch.no_grad():
        _adapter(model).prompt_embeddings.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    oracle = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        oracle.prompt_encoder["default"].embedding.weight.copy_(_adapter(model).prompt_embeddings)
        expected, out = oracle(**_batch()), model(**_batch())
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_sample_vocab_rows_come_from_the_table() -> None:
    model = _wrapped(n=5, prompt_tuning_init="SAMPLE_VOCAB")
    adapter = _adapter(model)
    table = adapter.ops.module.weight
    for row in adapter.prompt_embeddings.detach():
        assert (table == row).all(dim=1).any()


def test_text_init_repeats_and_truncates(tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 7, "world": 11}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    for n, ids in ((5, [7, 11, 7, 11, 7]), (1, [7])):
        model = _wrapped(n=n, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello world",
                         tokenizer_name_or_path=str(tmp_path))
        adapter = _adapter(model)
        assert torch.equal(adapter.prompt_embeddings.detach(), adapter.ops.module.weight.detach()[ids])


def test_training_lowers_the_loss() -> None:
    model = _wrapped()
    opt = torch.optim.Adam([_adapter(model).prompt_embeddings], lr=0.3)
    first = None
    for _ in range(20):
        loss = model(**_batch()).loss
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(model(**_batch()).loss.detach()) < 0.95 * first


def test_save_load_round_trip_and_config_json(tmp_path) -> None:
    model = _wrapped()
    with torch.no_grad():
        _adapter(model).prompt_embeddings.normal_()
        expected = model(**_batch()).logits
    peftkit.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "PROMPT_TUNING" and data["num_virtual_tokens"] == N
    assert "target_modules" not in data and "bias" not in data  # fields peft's PromptTuningConfig lacks
    loaded = AdapterModel(tiny_llama())
    peftkit.load_adapter(loaded, tmp_path)
    assert loaded.configs["default"] == model.configs["default"]
    with torch.no_grad():
        assert torch.equal(loaded(**_batch()).logits, expected)


def test_disable_and_delete_restore_the_base() -> None:
    with torch.no_grad():
        expected = tiny_llama()(**_batch()).logits
        model = _wrapped()
        with model.disabled():
            assert torch.equal(model(**_batch()).logits, expected)
        model.delete_adapter("default")
        assert not list(model.hosts())
        assert torch.equal(model(**_batch()).logits, expected)


@pytest.mark.parametrize("fields, field", [
    (dict(num_virtual_tokens=-1), "num_virtual_tokens"),
    (dict(num_virtual_tokens=None), "num_virtual_tokens"),
    (dict(prompt_tuning_init="ZEROS"), "prompt_tuning_init"),
    (dict(prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
    (dict(tokenizer_kwargs={"x": 1}), "tokenizer_kwargs"),
    (dict(num_transformer_submodules=2), "num_transformer_submodules"),
    (dict(token_dim=0), "token_dim"),
])
def test_bad_config_names_the_field(fields, field) -> None:
    with pytest.raises(ConfigError) as info:
        PromptTuningConfig(**fields)
    assert info.value.field == field


def test_layer_errors() -> None:
    model = AdapterModel(tiny_llama())
    with pytest.raises(UnsupportedLayerError, match="input token embedding"):
        model.add_adapter("a", PromptTuningConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError) as info:
        model.add_adapter("a", PromptTuningConfig(token_dim=5))
    assert info.value.field == "token_dim"
    two = tiny_llama()
    two.model.embed_tokens_2 = torch.nn.Embedding(8, 64)
    with pytest.raises(ConfigError, match="exactly one input embedding"):
        AdapterModel(two).add_adapter("a", PromptTuningConfig(target_modules=["embed_tokens", "embed_tokens_2"]))
    model.add_adapter("a", PromptTuningConfig())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 3, dtype=torch.long))


# --- peft checkpoint interop: peft stores the prompt under the bare key "prompt_embeddings" --------------------------

def test_peft_writes_peftkit_loads(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    oracle = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        oracle.prompt_encoder["default"].embedding.weight.normal_()
        expected = oracle(**_batch()).logits
    oracle.save_pretrained(tmp_path)
    model = AdapterModel(tiny_llama())
    peftkit.load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, expected, atol=1e-5, rtol=1e-5)


def test_peftkit_writes_peft_loads(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = _wrapped(task_type="CAUSAL_LM")
    with torch.no_grad():
        _adapter(model).prompt_embeddings.normal_()
        expected = model(**_batch()).logits
    peftkit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama()), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(oracle(**_batch()).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_facade_forward_and_generate_use_the_prompt() -> None:
    """PeftModel (what `peftkit train` wraps) runs the input transform in forward and generate."""
    model = peftkit.get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        _adapter(model).prompt_embeddings.normal_()
        ids = token_ids(batch=1)
        plain = AdapterModel(tiny_llama())  # the same base, no adapter
        expected = _wrapped()
        _adapter(expected).prompt_embeddings.copy_(_adapter(model).prompt_embeddings)
        torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits[:, -1], plain(input_ids=ids).logits[:, -1])
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3)  # decoder-only generate from inputs_embeds returns the new tokens only

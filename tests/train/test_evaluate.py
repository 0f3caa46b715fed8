"""peftkit.train.evaluate against hand-computed expectations on a tiny Llama and a word-level tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.train.data import PromptTemplate, make_batches
from peftkit.train.evaluate import eval_loss, label_word_accuracy, label_word_scores, seq_cls_accuracy

from .tiny_text import ids, tiny_llama, tiny_tokenizer

TEXTS = ["a great film", "a bad movie", "boring", "not very good and not fun", "the plot was fun",
         "the acting is bad", "great great great", "it was a film", "no", "yes it is good"]
SINGLE = PromptTemplate("Review: {text}\nSentiment:", {0: " negative", 1: " positive"})
MULTI = PromptTemplate("Review: {text}\nSentiment:", {0: " not very good", 1: " very good", 2: " boring"})


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


def examples(labels=(0, 1)):
    return [{"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(TEXTS)]


def by_hand(model, tok, example, template):
    """Log-prob of each label word after the prompt, one unpadded example at a time."""
    prompt = ids(tok, template.prompt(example))
    scores = []
    for word in template.label_words.values():
        word_ids = ids(tok, word)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + word_ids])).logits[0]  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, w]) for j, w in enumerate(word_ids)))
    return scores


@pytest.mark.parametrize("template", [SINGLE, MULTI], ids=["single-token", "multi-token"])
def test_scores_match_unbatched_hand_computation(model, tok, template):
    data = examples(tuple(template.label_words))
    expected = torch.tensor([by_hand(model, tok, e, template) for e in data])  # (N, L)
    for batch_size in (1, 3, 16):
        scores = label_word_scores(model, tok, data, template, batch_size=batch_size)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("template", [SINGLE, MULTI], ids=["single-token", "multi-token"])
def test_accuracy_is_the_argmax_of_the_scores(model, tok, template):
    labels = list(template.label_words)
    data = examples(tuple(labels))
    hand = [by_hand(model, tok, e, template) for e in data]
    predicted = [labels[max(range(len(labels)), key=scores.__getitem__)] for scores in hand]
    expected = sum(p == e["label"] for p, e in zip(predicted, data, strict=True)) / len(data)
    assert 0 < expected < 1, "pick examples where the tiny model is sometimes right and sometimes wrong"
    assert label_word_accuracy(model, tok, data, template, batch_size=4) == expected


def test_accuracy_with_truncation_matches_training_prompts(model, tok):
    data = examples()
    short = label_word_scores(model, tok, data, SINGLE, max_length=7)
    assert not torch.allclose(short, label_word_scores(model, tok, data, SINGLE))
    truncated = [dict(e, text=" ".join(e["text"].split()[:2])) for e in data]  # 4 frame + 2 text + 1 word = 7
    torch.testing.assert_close(short, label_word_scores(model, tok, truncated, SINGLE), atol=1e-5, rtol=1e-5)


def test_evaluation_restores_the_mode_and_leaves_no_grads(model, tok):
    model.train()
    label_word_accuracy(model, tok, examples()[:2], SINGLE)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()


def test_adapter_model_at_init_scores_like_its_base(tok):
    base = tiny_llama(len(tok), seed=1)
    expected = label_word_scores(base, tok, examples(), SINGLE)
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(label_word_scores(wrapped, tok, examples(), SINGLE), expected)


def test_empty_examples_are_an_error(model, tok):
    with pytest.raises(ValueError, match="at least one example"):
        label_word_accuracy(model, tok, [], SINGLE)


class FixedClassifier(nn.Module):
    """Predicts class = first input id mod 3."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=nn.functional.one_hot(input_ids[:, 0] % 3, 3).float() + self.weight)


def test_seq_cls_accuracy():
    batches = [{"input_ids": torch.tensor([[3, 1], [4, 1]]), "attention_mask": torch.ones(2, 2),
                "labels": torch.tensor([0, 2])},
               {"input_ids": torch.tensor([[5, 0]]), "attention_mask": torch.ones(1, 2), "labels": torch.tensor([2])}]
    assert seq_cls_accuracy(FixedClassifier(), batches) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no batches"):
        seq_cls_accuracy(FixedClassifier(), [])


def test_eval_loss_matches_the_model_loss(model, tok):
    data = [{"prompt": "what is it ?", "completion": "a film"}, {"prompt": "hello", "completion": "hi there"}]
    (batch,) = make_batches(data, tok, max_length=16, batch_size=2)
    with torch.no_grad():
        expected = float(model(**batch).loss)
    assert eval_loss(model, [batch]) == pytest.approx(expected, rel=1e-5)
    cls_batch = {"input_ids": torch.tensor([[3], [4]]), "labels": torch.tensor([0, 0])}
    with torch.no_grad():
        logits = FixedClassifier()(cls_batch["input_ids"]).logits
    expected = float(nn.functional.cross_entropy(logits, cls_batch["labels"]))
    assert eval_loss(FixedClassifier(), [cls_batch]) == pytest.approx(expected)

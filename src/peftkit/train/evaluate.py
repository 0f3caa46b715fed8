"""Deterministic evaluation: label-word accuracy for causal LMs, accuracy for classifiers, held-out loss.

Label-word accuracy scores each label word w after the prompt x by its log-probability under the model,
    score(w | x) = sum_t log p(w_t | x, w_<t),
and predicts the label with the highest score (no sampling; ties go to the first label). Prompts are built and
truncated exactly as for training (`data.encode`), so accuracy measures the task the adapter was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .data import IGNORE_INDEX, Encoded, Example, PromptTemplate, _pad_id, collate, encode

__all__ = ["label_word_scores", "label_word_accuracy", "seq_cls_accuracy", "eval_loss"]

NO_LIMIT = 1 << 30


@contextmanager
def _inference(model: nn.Module):
    """Eval mode and no grad inside; the model's previous train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    device = _device(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _single_token_words(tokenizer, template: PromptTemplate) -> list[int] | None:
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in template.label_words.values()]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def _by_length(items: Sequence[Encoded], batch_size: int):
    """(positions, batch) over `items` sorted by length, so each batch pads little; positions index `items`."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        positions = order[start: start + batch_size]
        yield positions, [items[i] for i in positions]


def _scores_single(model, tokenizer, examples, template, labels, word_ids, batch_size, max_length) -> Tensor:
    """One forward per example: the next-token log-probs at the prompt's last position. (N, L)"""
    pad = _pad_id(tokenizer)
    encoded = [encode(dict(e, label=labels[0]), tokenizer, max_length, template=template) for e in examples]
    prompts = [Encoded(c.input_ids[:-1], c.labels[:-1]) for c in encoded]  # drop the label word
    scores = torch.empty(len(prompts), len(word_ids))  # (N, L)
    for positions, chunk in _by_length(prompts, batch_size):
        batch = collate(chunk, pad)
        last = batch["attention_mask"].sum(dim=1) - 1  # (B,)
        logits = _logits(model, batch)  # (B, T, V)
        picked = logits[torch.arange(len(chunk)), last.to(logits.device)]  # (B, V)
        scores[positions] = torch.log_softmax(picked, dim=-1)[:, word_ids].cpu()  # (B, L)
    return scores


def _sequence_logprob(model, batch: Mapping[str, Tensor]) -> Tensor:
    """Sum of log p(target) over positions whose label is not -100, per row. (B,)"""
    logits = _logits(model, batch)  # (B, T, V)
    targets = batch["labels"][:, 1:].to(logits.device)  # (B, T-1): token t+1 is predicted at t
    where = targets != IGNORE_INDEX  # (B, T-1)
    picked = torch.log_softmax(logits[:, :-1][where], dim=-1)  # (K, V)
    token_lp = picked.gather(1, targets[where].unsqueeze(1)).squeeze(1)  # (K,)
    rows = where.nonzero()[:, 0]  # (K,)
    return torch.zeros(len(targets), device=logits.device).index_add(0, rows, token_lp).cpu()


def _scores_general(model, tokenizer, examples, template, labels, batch_size, max_length) -> Tensor:
    """One forward per (example, label word): the summed log-prob of the word's tokens. (N, L)"""
    pad = _pad_id(tokenizer)
    pairs = [encode(dict(e, label=k), tokenizer, max_length, template=template) for e in examples for k in labels]
    scores = torch.empty(len(pairs))  # (N * L,)
    for positions, chunk in _by_length(pairs, batch_size):
        scores[positions] = _sequence_logprob(model, collate(chunk, pad))
    return scores.view(len(examples), len(labels))


def label_word_scores(model: nn.Module, tokenizer, examples: Sequence[Example], template: PromptTemplate,
                      batch_size: int = 16, max_length: int | None = None) -> Tensor:
    """(N, L) log-probabilities of each label word (columns in `template.label_words` order) after each prompt.
    One forward per example when every label word is a single token, else one per (example, word)."""
    labels = list(template.label_words)
    limit = max_length or NO_LIMIT
    word_ids = _single_token_words(tokenizer, template)
    with _inference(model):
        if word_ids is not None:
            return _scores_single(model, tokenizer, examples, template, labels, word_ids, batch_size, limit)
        return _scores_general(model, tokenizer, examples, template, labels, batch_size, limit)


def label_word_accuracy(model: nn.Module, tokenizer, examples: Sequence[Example], template: PromptTemplate,
                        batch_size: int = 16, max_length: int | None = None) -> float:
    """Fraction of `{"text", "label"}` examples whose own label word scores highest (see module docstring)."""
    if not examples:
        raise ValueError("label_word_accuracy needs at least one example")
    scores = label_word_scores(model, tokenizer, examples, template, batch_size, max_length)  # (N, L)
    labels = list(template.label_words)
    predicted = [labels[i] for i in scores.argmax(dim=1).tolist()]
    return sum(p == e["label"] for p, e in zip(predicted, examples, strict=True)) / len(examples)


def seq_cls_accuracy(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> float:
    """Accuracy of argmax logits against `labels` (B,) over sequence-classification batches."""
    right = total = 0
    with _inference(model):
        for batch in batches:
            predicted = _logits(model, batch).argmax(dim=-1).cpu()  # (B,)
            right += int((predicted == batch["labels"]).sum())
            total += len(predicted)
    if not total:
        raise ValueError("seq_cls_accuracy got no batches")
    return right / total


def eval_loss(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> float:
    """Mean cross-entropy per supervised token (causal LM batches) or per example (classification batches)."""
    loss_sum, count = 0.0, 0
    with _inference(model):
        for batch in batches:
            labels = batch["labels"]
            if labels.dim() == 1:
                logits = _logits(model, batch)  # (B, C)
                loss_sum += float(nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="sum"))
                count += len(labels)
            else:
                loss_sum -= float(_sequence_logprob(model, batch).sum())
                count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    if not count:
        raise ValueError("eval_loss got no supervised tokens")
    return loss_sum / count

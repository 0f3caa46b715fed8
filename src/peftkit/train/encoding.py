"""Tokenizing one example, with a loss mask: the formats, the prompt template for classification, truncation.

Formats (one dict per example): `{"prompt", "completion"}` (loss on completion + EOS), `{"messages": [...]}`
(chat template; loss on assistant turns), `{"text", "label"}` (classification: prompt + label word for a causal
LM, loss on the word; an integer label for sequence classification), `{"text"}` (loss on every token).
Label positions without loss are -100, the value PyTorch's cross-entropy ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError

__all__ = ["IGNORE_INDEX", "Example", "FORMATS", "PromptTemplate", "SENTIMENT_TEMPLATE", "Encoded",
           "detect_format", "encode"]

IGNORE_INDEX = -100
Example = dict[str, Any]

# format name -> the fields every example of that format has (checked most specific first)
FORMATS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "classification": ("text", "label"),
    "text": ("text",),
}


def detect_format(example: Mapping[str, Any], where: str = "example") -> str:
    """The first format in `FORMATS` whose fields `example` has; `DataError` (prefixed by `where`) if none."""
    for name, fields in FORMATS.items():
        if all(f in example for f in fields):
            return name
    expected = " or ".join("{" + ", ".join(map(repr, f)) + "}" for f in FORMATS.values())
    raise DataError(f"{where}: has fields {sorted(example)}; expected {expected}")


@dataclass(frozen=True)
class PromptTemplate:
    """Renders a classification example as a prompt; the label word is the completion.

    `template` is a `str.format` string over the example's fields; `label_words` maps label -> word, with the
    word's leading space (" positive"), since the word follows the prompt directly.
    """

    template: str = "Review: {text}\nSentiment:"
    label_words: Mapping[int, str] = field(default_factory=lambda: {0: " negative", 1: " positive"})

    def __post_init__(self) -> None:
        if not self.label_words:
            raise DataError("PromptTemplate.label_words is empty")
        if len(set(self.label_words.values())) != len(self.label_words):
            raise DataError(f"PromptTemplate.label_words has repeated words: {dict(self.label_words)}")

    def prompt(self, example: Mapping[str, Any]) -> str:
        try:
            return self.template.format(**example)
        except KeyError as error:
            raise DataError(f"template {self.template!r} needs field {error}; example has {sorted(example)}") from None

    def word(self, label: Any) -> str:
        if label not in self.label_words:
            raise DataError(f"label {label!r} has no label word; label_words has {sorted(self.label_words)}")
        return self.label_words[label]


SENTIMENT_TEMPLATE = PromptTemplate()


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: `labels` is a list (causal LM, -100 where no loss) or an int (seq-cls)."""

    input_ids: list[int]
    labels: list[int] | int

    @property
    def has_loss(self) -> bool:
        return isinstance(self.labels, int) or any(t != IGNORE_INDEX for t in self.labels)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _pair(prompt: list[int], completion: list[int], max_length: int) -> Encoded:
    """prompt + completion, cut to `max_length`: the prompt loses tokens from the left, then the completion
    from the right. Loss only on the completion."""
    completion = completion[:max_length]
    prompt = prompt[max(0, len(prompt) - (max_length - len(completion))):] if completion else prompt[-max_length:]
    return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def _fit_text(example: Example, template: PromptTemplate, tokenizer, budget: int) -> list[int]:
    """The rendered prompt's ids, dropping words from the end of "text" until it fits in `budget` tokens."""
    ids = _ids(tokenizer, template.prompt(example), special=True)
    words = str(example.get("text", "")).split()
    while len(ids) > budget and words:
        keep = min(len(words) - 1, len(words) * budget // len(ids))
        words = words[:keep]
        ids = _ids(tokenizer, template.prompt(dict(example, text=" ".join(words))), special=True)
    return ids


def _encode_messages(example: Example, tokenizer, max_length: int) -> Encoded:
    """Chat template rendering; assistant turns (their closing tokens included) carry the loss."""
    messages = example["messages"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("'messages' examples need a tokenizer with a chat template")

    def render(turns, prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        return _ids(tokenizer, text, special=False)

    ids = render(messages, prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("a conversation must not start with an assistant turn (nothing to condition on)")
        before, through = render(messages[:i], prompt=True), render(messages[: i + 1], prompt=False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise DataError("the chat template does not render conversations prefix by prefix; cannot mask turns")
        labels[len(before): len(through)] = ids[len(before): len(through)]
    return Encoded(ids[:max_length], labels[:max_length])


def encode(example: Example, tokenizer, max_length: int, task: str = "causal_lm",
           template: PromptTemplate | None = None) -> Encoded:
    """Tokenize one example of any format in `FORMATS` for `task` ("causal_lm" or "seq_cls")."""
    kind = detect_format(example)
    if task == "seq_cls":
        if kind != "classification":
            raise DataError(f"task 'seq_cls' needs {{'text', 'label'}} examples, got {sorted(example)}")
        ids = list(tokenizer(str(example["text"]), truncation=True, max_length=max_length)["input_ids"])
        return Encoded(ids, int(example["label"]))
    if kind == "chat":
        return _encode_messages(example, tokenizer, max_length)
    if kind == "text":
        ids = _ids(tokenizer, str(example["text"]), special=True)[:max_length]
        return Encoded(ids, list(ids))
    if kind == "classification":
        template = template or SENTIMENT_TEMPLATE
        word = _ids(tokenizer, template.word(example["label"]), special=False)
        return _pair(_fit_text(example, template, tokenizer, max_length - len(word)), word, max_length)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = _ids(tokenizer, str(example["prompt"]), special=True)
    completion = _ids(tokenizer, str(example["completion"]), special=False) + eos
    return _pair(prompt, completion, max_length)

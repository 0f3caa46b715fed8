"""Merge an adapter into its base model and write a plain model directory that loads without peftkit.

Why: serving stacks and evaluation harnesses that know nothing of adapters can then use the fine-tuned model
(`AutoModelForCausalLM.from_pretrained(out_dir)`). The directory is written to a temporary sibling and renamed
into place, so a crash never leaves a half-written model under `out_dir`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["merge_to_dir", "staged_dir"]


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to replace a non-empty directory unless asked to."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True or choose another path")


@contextmanager
def staged_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir` by rename.

    On any exception the temporary directory is removed and `out_dir` is left exactly as it was. With
    overwrite=True an existing `out_dir` is moved aside first and deleted only after the new one is in place.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _load_base(model_or_path: nn.Module | str | os.PathLike, **from_pretrained_kwargs: Any) -> nn.Module:
    """An nn.Module is used as is (and merged in place); a path is loaded with AutoModelForCausalLM, offline."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from transformers import AutoModelForCausalLM

    kwargs = {"local_files_only": True} | from_pretrained_kwargs
    return AutoModelForCausalLM.from_pretrained(str(model_or_path), **kwargs)


def _save_model(model: nn.Module, where: Path) -> None:
    """HF models via save_pretrained (safetensors); plain modules as one model.safetensors of their state."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(where)
        return
    from safetensors.torch import save_model

    save_model(model, str(where / "model.safetensors"))


def merge_to_dir(model_or_path: nn.Module | str | os.PathLike, adapter_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False,
                 **from_pretrained_kwargs: Any) -> Path:
    """Fold the adapter in `adapter_dir` into the base weights and save the plain model to `out_dir`.

    model_or_path: an nn.Module (merged in place: pass a copy to keep the original), or a local HF model
        directory loaded with `AutoModelForCausalLM.from_pretrained(..., local_files_only=True)`.
    tokenizer: saved beside the model when given (anything with `save_pretrained`).
    Merging uses safe_merge=True, so a merge that produces NaN/Inf raises instead of writing a broken model.
    Returns `out_dir`. Raises FileExistsError if `out_dir` is non-empty and overwrite is False.
    """
    from ..compat import PeftModel

    _check_target(Path(out_dir), overwrite)
    base = _load_base(model_or_path, **from_pretrained_kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(safe_merge=True)
    with staged_dir(out_dir, overwrite) as tmp:
        _save_model(merged, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)

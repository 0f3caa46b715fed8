"""Per-sequence KV caches <-> one padded batch for a forward of a HF causal LM (mixed prefill and decode).

Row b holds sequence b: its cached keys/values left-padded to the longest past P, its new tokens right-padded to
the longest new chunk T. The attention mask (B, P + T) hides both paddings and position ids continue each
sequence, so every real token attends to exactly the keys it would attend to alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

__all__ = ["Batch", "build_batch", "split_cache"]

KV = list[tuple[Tensor, Tensor]]  # per layer: keys, values (1, H, t, D)


@dataclass
class Batch:
    kwargs: dict  # input_ids, attention_mask, position_ids, past_key_values, use_cache
    past: list[int]  # cached tokens per row
    new: list[int]  # new tokens per row
    width: int  # P, the padded past length
    last_index: Tensor  # (B,) index of each row's last real new token in the T axis


def build_batch(rows: Sequence[tuple[list[int], KV]], device: torch.device) -> Batch:
    """rows: (new token ids, cached kv) per sequence."""
    past = [kv[0][0].shape[2] if kv else 0 for _, kv in rows]
    new = [len(ids) for ids, _ in rows]
    p, t = max(past), max(new)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), p + t, dtype=torch.long)
    for b, (tokens, _) in enumerate(rows):
        ids[b, :new[b]] = torch.tensor(tokens)
        mask[b, p - past[b]:p + new[b]] = 1
    positions = torch.tensor(past)[:, None] + torch.arange(t)[None, :]  # (B, T)
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
              "use_cache": True, "past_key_values": _padded_cache([kv for _, kv in rows], past, p)}
    return Batch(kwargs, past, new, p, torch.tensor(new, device=device) - 1)


def _padded_cache(kvs: list[KV], past: list[int], width: int) -> DynamicCache:
    if width == 0:
        return DynamicCache()
    ref = next(kv for kv in kvs if kv)
    layers = []
    for layer in range(len(ref)):
        k0 = ref[layer][0]
        keys = k0.new_zeros(len(kvs), k0.shape[1], width, k0.shape[3])  # (B, H, P, D)
        values = ref[layer][1].new_zeros(len(kvs), ref[layer][1].shape[1], width, ref[layer][1].shape[3])
        for b, kv in enumerate(kvs):
            if kv:
                keys[b, :, width - past[b]:] = kv[layer][0][0]
                values[b, :, width - past[b]:] = kv[layer][1][0]
        layers.append((keys, values))
    return DynamicCache(layers)


def split_cache(cache: DynamicCache, batch: Batch) -> list[KV]:
    """Each row's keys/values after the forward: its real past plus its real new tokens, (1, H, t, D)."""
    out: list[KV] = [[] for _ in batch.past]
    p = batch.width
    for layer in cache.layers:
        for b, (n_past, n_new) in enumerate(zip(batch.past, batch.new, strict=True)):
            sl = slice(p - n_past, p + n_new)
            out[b].append((layer.keys[b:b + 1, :, sl].clone(), layer.values[b:b + 1, :, sl].clone()))
    return out

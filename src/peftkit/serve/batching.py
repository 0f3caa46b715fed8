"""Per-sequence KV caches <-> one padded batch for a forward of a HF causal LM (mixed prefill and decode).

Row b holds sequence b: its cached keys/values left-padded to the longest past P, its new tokens right-padded to
the longest new chunk T. The attention mask (B, P + T) hides both paddings and position ids continue each
sequence, so every real token attends to exactly the keys it would attend to alone.

Steady decode does not rebuild anything: when every row of the next step is a row of the last forward that
takes one new token, and the last forward had no right padding (every row took the same number of new tokens),
the last forward's output cache already has the layout the next step needs. `decode_batch` keeps it (rows that
left are dropped with one index_select, all-padding columns on the left are cut off) and extends the mask by one
column. The cache layers grow into preallocated capacity (`GrowingLayer`), so appending a token does not copy the
whole context each step. Only a change of composition with prefill (a request joins) goes through
`split_cache` + `build_batch`, which copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["Batch", "GrowingLayer", "build_batch", "decode_batch", "split_cache"]

KV = list[tuple[Tensor, Tensor]]  # per layer: keys, values (1, H, t, D)


@dataclass
class Batch:
    kwargs: dict  # input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep
    past: list[int]  # cached tokens per row
    new: list[int]  # new tokens per row
    width: int  # P, the padded past length
    last_index: Tensor  # (B,) index of each row's last real new token in the T axis

    def __post_init__(self) -> None:
        self.kwargs["logits_to_keep"] = self.last_index[:, None]  # (B, 1): logits at each row's last token only
        self.lengths = [p + n for p, n in zip(self.past, self.new, strict=True)]  # tokens cached after the forward
        self.aligned = min(self.new) == max(self.new)  # no right padding: the output cache extends in place


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into preallocated capacity (doubling) instead of concatenating every step."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self._k, self._v, self._n = key_states, value_states, key_states.shape[-2]
        else:
            n = self._n + key_states.shape[-2]
            if n > self._k.shape[-2]:
                self._k, self._v = _grown(self._k, self._n, n), _grown(self._v, self._n, n)
            self._k[:, :, self._n:n] = key_states
            self._v[:, :, self._n:n] = value_states
            self._n = n
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]  # (B, H, n, D) views
        return self.keys, self.values

    def set(self, keys: Tensor, values: Tensor) -> None:
        """Replace the contents (rows or columns selected by the caller); the next append reallocates."""
        self.keys, self.values, self._k, self._v, self._n = keys, values, keys, values, keys.shape[-2]


def _grown(buf: Tensor, used: int, need: int) -> Tensor:
    out = buf.new_empty(*buf.shape[:2], max(2 * need, 16), buf.shape[3])  # (B, H, capacity, D)
    out[:, :, :used] = buf[:, :, :used]
    return out


def _cache(layers: Sequence[tuple[Tensor, Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for keys, values in layers:
        layer = GrowingLayer()
        layer.update(keys, values)  # takes the tensors as they are: no copy
        cache.layers.append(layer)
    return cache


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
        cache = DynamicCache()
        cache.layer_class_to_replicate = GrowingLayer  # layers made on first update grow in place too
        return cache
    ref = next(kv for kv in kvs if kv)
    layers = []
    for layer in range(len(ref)):
        k0, v0 = ref[layer]
        keys = k0.new_zeros(len(kvs), k0.shape[1], width, k0.shape[3])  # (B, H, P, D)
        values = v0.new_zeros(len(kvs), v0.shape[1], width, v0.shape[3])
        for b, kv in enumerate(kvs):
            if kv:
                keys[b, :, width - past[b]:] = kv[layer][0][0]
                values[b, :, width - past[b]:] = kv[layer][1][0]
        layers.append((keys, values))
    return _cache(layers)


def split_cache(cache: DynamicCache, batch: Batch) -> list[KV]:
    """Each row's keys/values after the forward: its real past plus its real new tokens, (1, H, t, D) views."""
    out: list[KV] = [[] for _ in batch.past]
    p = batch.width
    for layer in cache.layers:
        for b, (n_past, n_new) in enumerate(zip(batch.past, batch.new, strict=True)):
            sl = slice(p - n_past, p + n_new)
            out[b].append((layer.keys[b:b + 1, :, sl], layer.values[b:b + 1, :, sl]))
    return out


def decode_batch(prev: Batch, cache: DynamicCache, keep: list[int], tokens: list[int]) -> Batch:
    """The next decode step from the last forward (`prev`, aligned, its output `cache`): rows `keep` of it, in
    that order, each taking one new token. The cache is reused in place (rows dropped, left padding cut)."""
    mask = prev.kwargs["attention_mask"]  # (B0, W) real columns of every row are a suffix
    device = mask.device
    past = [prev.lengths[b] for b in keep]
    width = max(past)
    rows = None if keep == list(range(len(prev.past))) else torch.tensor(keep, device=device)
    cut = mask.shape[1] - width  # leading columns no kept row uses
    if rows is not None or cut:
        mask = mask[:, cut:] if rows is None else mask.index_select(0, rows)[:, cut:]
        for layer in cache.layers:
            k, v = layer.keys[:, :, cut:], layer.values[:, :, cut:]  # (B0, H, width, D)
            if rows is not None:
                k, v = k.index_select(0, rows), v.index_select(0, rows)
            _set(layer, k, v)
    b = len(keep)
    kwargs = {"input_ids": torch.tensor(tokens, device=device)[:, None],
              "attention_mask": torch.cat([mask, mask.new_ones(b, 1)], dim=1),
              "position_ids": torch.tensor(past, device=device)[:, None], "use_cache": True,
              "past_key_values": cache}
    return Batch(kwargs, past, [1] * b, width, torch.zeros(b, dtype=torch.long, device=device))


def _set(layer, keys: Tensor, values: Tensor) -> None:
    if isinstance(layer, GrowingLayer):
        layer.set(keys, values)
    else:
        layer.keys, layer.values = keys, values

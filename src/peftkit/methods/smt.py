"""SMT, Sparse Matrix Tuning: fine-tune only the weight blocks whose warm-up gradients score highest.

Paper: He et al., "Sparse Matrix in Large Language Model Fine-tuning", arXiv 2405.15525 (ICLR 2025); code:
HectorHHZ/Sparse_Matrix_Tuning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import adapter_dtype, pattern_value

__all__ = ["SMTConfig", "SMTAdapter", "SCORES", "block_scores"]

SCORES = ("mean_abs", "abs_mean", "l1", "l2")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, f"must be an integer >= 1, got {value!r}")


@register_config
@dataclass(frozen=True, kw_only=True)
class SMTConfig(AdapterConfig):
    """SMT settings (peft_type "SMT"; peft has no such method).

    block_size: side of the square blocks (paper: 256); a layer smaller than that uses min(out, in), and both of its
    dimensions must be multiples of the size it uses. num_blocks: N, the blocks selected over all target layers (one
    global top-N). block_budgets: {regex: N_g}, separate budgets (the paper's attention / MLP split): a layer joins the
    group of the first regex that re.search-es its path; layers matching none share num_blocks. score: of a block's
    mean calibration gradient G: "mean_abs" |mean(G)| (paper default), "abs_mean" mean|G|, "l1" sum|G|, "l2" ||G||_F.
    layer_blocks: per-layer selected counts, recorded when saving (not compared: derived from the selection).
    """

    peft_type: ClassVar[str] = "SMT"
    method_name: ClassVar[str] = "smt"

    block_size: int = 256
    num_blocks: int = 64
    block_budgets: dict[str, int] = field(default_factory=dict)
    score: str = "mean_abs"
    layer_blocks: dict[str, int] = field(default_factory=dict, compare=False)

    def validate(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("num_blocks", self.num_blocks)
        for key, value in self.block_budgets.items():
            _positive_int(f"block_budgets[{key!r}]", value)
            try:
                re.compile(key)
            except re.error as e:
                raise ConfigError("block_budgets", f"key {key!r} is not a regular expression ({e})") from e
        if self.score not in SCORES:
            raise ConfigError("score", f"must be one of {SCORES}, got {self.score!r}")
        for key, value in self.layer_blocks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("layer_blocks", f"{key!r}: must be an integer >= 0, got {value!r}")

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> SMTConfig:
        counts = {re.escape(path): fields["layer_blocks"] for path, fields in per_layer.items()}
        return self.replace(layer_blocks=counts)

    def budget_group(self, path: str) -> str | None:
        return next((key for key in self.block_budgets if re.search(key, path)), None)


def block_scores(g: Tensor, bs: int, score: str) -> Tensor:
    """(out/bs, in/bs) scores of the bs x bs blocks of a gradient G (out, in)."""
    blocks = g.float().reshape(g.shape[0] // bs, bs, g.shape[1] // bs, bs).transpose(1, 2)  # (R, C, bs, bs)
    if score == "mean_abs":
        return blocks.mean((-1, -2)).abs()
    if score == "abs_mean":
        return blocks.abs().mean((-1, -2))
    if score == "l1":
        return blocks.abs().sum((-1, -2))
    return blocks.square().sum((-1, -2)).sqrt()


@register_adapter("smt", SMTConfig)
class SMTAdapter(Adapter):
    """SMT (arXiv 2405.15525): y = W x + b + D x, D block-sparse: D[r_i, c_i] = smt_delta[i] for the selected blocks.

    Selection (calibrate): every layer scores its blocks from the mean calibration gradient G (core.calibrate "grad",
    the warm-up); the last layer to calibrate picks the global top-N (per budget group) and hands each layer its
    blocks. smt_delta (n, bs, bs) is trainable and starts at 0; smt_block_index (n, 2) holds (block row, block column),
    a persistent integer buffer. Forward: x_blocks @ delta_i^T per block, added into output block r_i, so gradients
    exist only for the selected blocks (the dense gradient restricted to them). Identity at init.
    Merge: W' = W + D, exact; every other block of W stays bit-identical.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    calibration = frozenset({"grad"})

    def __init__(self, ops: LayerOps, config: SMTConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        path = self.path = ctx.path if ctx is not None and ctx.path else "layer"
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"{path}: smt adapts nn.Linear and transformers Conv1D only, not {ops.kind} "
                                        "layers; narrow target_modules")
        out, inp = ops.out_features, ops.in_features
        self.bs = bs = min(config.block_size, out, inp)
        if out % bs or inp % bs:
            raise UnsupportedLayerError(f"{path}: ({out}, {inp}) does not split into {bs}x{bs} blocks; set block_size "
                                        "to a common divisor of the layer's dimensions or exclude this module")
        n = 0 if initialize else pattern_value(config.layer_blocks, path, None)
        if n is None:
            raise ConfigError("layer_blocks", f"has no block count for {path}; the adapter config was not written by "
                                              "save_adapter, or belongs to another model")
        self._dtype, self._device = adapter_dtype(ops), ops.weight.device
        self.register_buffer("smt_block_index", torch.zeros(n, 2, dtype=torch.long, device=self._device))  # (n, 2)
        self.smt_delta = self.new_param((n, bs, bs), self._dtype, self._device)  # (n, bs, bs)
        shared = ctx.shared if ctx is not None else {}  # without a context the layer selects on its own
        self._smt = shared.setdefault("smt", {"members": [], "scores": {}})
        self._smt["members"].append(self)

    def calibrate(self, stats: dict[str, Tensor]) -> None:
        """Score this layer's blocks; the last layer to calibrate selects the top blocks of every layer."""
        shared = self._smt
        shared["scores"][id(self)] = block_scores(stats["grad"], self.bs, self.config.score).flatten().cpu()
        if len(shared["scores"]) == len(shared["members"]):
            select(shared["members"], shared.pop("scores"), self.config)

    @property
    def grid(self) -> tuple[int, int]:
        return self.ops.out_features // self.bs, self.ops.in_features // self.bs

    def set_blocks(self, flat: Tensor) -> None:
        """Train the blocks at flat indices `flat` (row-major over the block grid), from 0."""
        flat = flat.sort().values.to(self._device)  # (n,)
        cols = self.grid[1]
        self.smt_block_index = torch.stack([flat // cols, flat % cols], dim=1)  # (n, 2)
        self.smt_delta = nn.Parameter(torch.zeros(len(flat), self.bs, self.bs, dtype=self._dtype, device=self._device))

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        rows, cols = self.smt_block_index.unbind(1)  # (n,), (n,)
        (nr, nc), bs, d = self.grid, self.bs, self.smt_delta
        xb = self.cast_input(x, d).reshape(-1, nc, bs)[:, cols]  # (N, n, bs)
        yb = torch.einsum("tnb,nob->tno", xb, d)  # (N, n, bs): delta_i @ x_block
        out = xb.new_zeros(xb.shape[0], nr, bs).index_add(1, rows, yb)  # (N, out/bs, bs)
        return out.reshape(*x.shape[:-1], nr * bs)  # (..., out)

    def delta_weight(self) -> Tensor:
        (nr, nc), bs = self.grid, self.bs
        rows, cols = self.smt_block_index.unbind(1)
        d = self.smt_delta.new_zeros(nr, nc, bs, bs, dtype=torch.float32)  # (R, C, bs, bs)
        d[rows, cols] = self.smt_delta.float()
        return d.transpose(1, 2).reshape(nr * bs, nc * bs)  # (out, in)

    def lowered(self) -> LowRank:
        """Exact, of rank n*bs: A selects the input blocks c_i, B places delta_i at output block r_i."""
        (nr, nc), bs, d = self.grid, self.bs, self.smt_delta.detach()
        rows, cols = self.smt_block_index.unbind(1)
        n, i = d.shape[0], torch.arange(d.shape[0], device=d.device)
        a = d.new_zeros(n, bs, nc, bs)  # (n, bs, C, bs)
        a[i, :, cols, :] = torch.eye(bs, dtype=d.dtype, device=d.device)
        b = d.new_zeros(nr, bs, n, bs)  # (R, bs, n, bs)
        b[rows, :, i, :] = d
        return LowRank(a.reshape(n * bs, nc * bs), b.reshape(nr * bs, n * bs), 1.0)

    def disk_names(self) -> dict[str, str]:
        return {"smt_delta": "smt_delta", "smt_block_index": "smt_block_index"}

    def layer_fields(self) -> dict[str, Any]:
        return {"layer_blocks": int(self.smt_delta.shape[0])}


def select(members: list[SMTAdapter], scores: dict[int, Tensor], config: SMTConfig) -> None:
    """Global top-N blocks per budget group over `members`; each layer gets its own (possibly none)."""
    groups: dict[str | None, list[SMTAdapter]] = {}
    for adapter in members:
        groups.setdefault(config.budget_group(adapter.path), []).append(adapter)
    for key, adapters in groups.items():
        budget = config.num_blocks if key is None else config.block_budgets[key]
        flat = torch.cat([scores[id(a)] for a in adapters])  # (total blocks,)
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[flat.topk(min(budget, flat.numel())).indices] = True
        for adapter, part in zip(adapters, chosen.split([len(scores[id(a)]) for a in adapters]), strict=True):
            adapter.set_blocks(part.nonzero().flatten())

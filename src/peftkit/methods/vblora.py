"""VB-LoRA: every sub-vector of every LoRA factor is a top-k softmax mixture of one shared vector bank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import adapter_dtype, check_rank

__all__ = ["VBLoRAConfig", "VBLoRAAdapter", "mix"]

BANK = "vblora_vector_bank"
_TOPK_KEYS = {f"topk_{p}_{kind}": f"vblora_logits_{p}_topk_{kind}" for p in "AB" for kind in ("weights", "indices")}


@register_config
@dataclass(frozen=True, kw_only=True)
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA settings with peft's field names (peft_type "VBLORA").

    r: rank. num_vectors (h) / vector_length (b): the bank holds h vectors of length b; every adapted layer's
    in and out features must be divisible by b. topk: k bank vectors mixed per sub-vector. vblora_dropout:
    dropout on the adapter input. save_only_topk_weights: write k-1 weights + k indices per sub-vector instead of
    the logits (inference only). init_vector_bank_bound: bank ~ U(-bound, bound). init_logits_std: logits ~
    N(0, std^2). fan_in_fan_out: accepted for compatibility; Conv1D layers are detected by type.
    bias="vblora_only" (peft's spelling) is read as "lora_only".
    """

    peft_type: ClassVar[str] = "VBLORA"
    method_name: ClassVar[str] = "vblora"

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def __post_init__(self) -> None:
        if self.bias == "vblora_only":
            self._set("bias", "lora_only")
        super().__post_init__()

    def validate(self) -> None:
        check_rank("r", self.r)
        for name in ("num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.topk > self.num_vectors:
            raise ConfigError("topk", f"topk={self.topk} exceeds num_vectors={self.num_vectors}; lower topk")
        if not (isinstance(self.vblora_dropout, (int, float)) and 0 <= self.vblora_dropout < 1):
            raise ConfigError("vblora_dropout", f"must be in [0, 1), got {self.vblora_dropout!r}")
        for name in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(name, f"must be a number > 0 (a zero bank or zero logits get no gradient), "
                                        f"got {value!r}")


def mix(logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """(..., h) logits -> (..., b): sum_j softmax(top-k logits)_j * bank[idx_j], as peft's _get_low_rank_matrix."""
    top, idx = logits.topk(k, dim=-1)  # (..., k), (..., k)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)  # (..., b)


def _index_dtype(num_vectors: int) -> torch.dtype:
    """peft's choice: the smallest integer type that holds every index."""
    for bound, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < bound:
            return dtype
    return torch.int64


def _topk_property(key: str) -> property:
    """topk_{A,B}_{weights,indices}: computed from the logits for saving, a staging tensor while loading."""
    which, kind = key.split("_")[1:]

    def get(self: VBLoRAAdapter) -> Tensor:
        if key in self._staged:
            return self._staged[key]
        top, idx = getattr(self, f"vblora_logits_{which}").detach().topk(self.config.topk, dim=-1)  # (..., k)
        if kind == "indices":
            return idx.to(_index_dtype(self.config.num_vectors))
        return F.softmax(top, dim=-1)[..., :-1].contiguous()  # (..., k-1): the last weight is 1 - sum

    return property(get)


@register_adapter("vblora", VBLoRAConfig)
class VBLoRAAdapter(Adapter):
    """VB-LoRA (arXiv 2405.15179): y = W x + b + B A drop(x), no alpha/r scaling.

    Bank (h, b) shared by every layer; logits Z_A (r, in/b, h), Z_B (out/b, r, h). Each sub-vector is
    sum_j softmax(topk(z))_j bank[idx_j]; row i of A concatenates its in/b sub-vectors, column j of B its out/b.
    Not identity at init (random bank and logits). Merge: W' = W + B A, exact. The logits train at 10x the
    learning rate (the paper's separate rates; spec §1.12)."""

    capabilities = frozenset({"mergeable", "servable"})
    lr_scale = {"vblora_logits_A": 10.0, "vblora_logits_B": 10.0}

    def __init__(self, ops: LayerOps, config: VBLoRAConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        b, name = config.vector_length, ctx.path if ctx is not None and ctx.path else "layer"
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"{name}: vblora adapts nn.Linear and transformers Conv1D only, not "
                                        f"{ops.kind} layers; narrow target_modules")
        if ops.in_features % b or ops.out_features % b:
            raise UnsupportedLayerError(
                f"{name}: in_features={ops.in_features} and out_features={ops.out_features} must both be divisible "
                f"by vector_length={b}; choose a vector_length that divides them or exclude this module")
        dtype, device = adapter_dtype(ops), ops.weight.device
        self.vblora_logits_A = self.new_param((config.r, ops.in_features // b, config.num_vectors), dtype, device)
        self.vblora_logits_B = self.new_param((ops.out_features // b, config.r, config.num_vectors), dtype, device)
        self.vblora_vector_bank = self._bank(config, ctx, dtype, device, initialize)  # (h, b), shared
        self.dropout = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()
        self._staged, self._topk_only = {}, False  # top-k checkpoint tensors while loading, see after_load
        if initialize:
            with torch.no_grad():
                nn.init.normal_(self.vblora_logits_A, 0.0, config.init_logits_std)
                nn.init.normal_(self.vblora_logits_B, 0.0, config.init_logits_std)
        elif config.save_only_topk_weights:  # staging tensors of the file's dtypes, see after_load
            self._staged = {key: torch.zeros_like(getattr(self, key)) for key in _TOPK_KEYS}

    @staticmethod
    def _bank(config: VBLoRAConfig, ctx: AdapterContext | None, dtype, device, initialize: bool) -> nn.Parameter:
        """The injection's one bank, created by the first layer."""
        shared = ctx.shared if ctx is not None else {}
        if BANK not in shared:
            bank = torch.zeros(config.num_vectors, config.vector_length, dtype=dtype, device=device)  # (h, b)
            if initialize:
                nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
            shared[BANK] = nn.Parameter(bank)
        return shared[BANK]

    def factors(self) -> tuple[Tensor, Tensor]:
        """A (r, in) and B (out, r) composed from the bank."""
        if self._topk_only and self.vblora_logits_A.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("this VB-LoRA adapter was loaded from a save_only_topk_weights checkpoint: its "
                               "other logits are -inf, so it can be used for inference or merging, not training")
        k, bank = self.config.topk, self.vblora_vector_bank
        za, zb = self.vblora_logits_A, self.vblora_logits_B
        a = mix(za, bank, k).reshape(za.shape[0], -1)  # (r, in/b, b) -> (r, in)
        b = mix(zb, bank, k).transpose(1, 2).reshape(-1, zb.shape[1])  # (out/b, r, b) -> (out/b, b, r) -> (out, r)
        return a, b

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        a, b = self.factors()
        return self.ops.up(self.ops.down(self.cast_input(self.dropout(x), a), a), b)  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        a, b = self.factors()
        return self.ops.up_add_(y, self.ops.down(self.cast_input(self.dropout(x), a), a), b)  # y += B A drop(x)

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return b.float() @ a.float()  # (out, in)

    def lowered(self) -> LowRank:
        a, b = self.factors()
        return LowRank(a, b, 1.0)

    def disk_names(self) -> dict[str, str]:
        if self.config.save_only_topk_weights:
            return dict(_TOPK_KEYS)
        return {"vblora_logits_A": "vblora_logits_A", "vblora_logits_B": "vblora_logits_B"}

    def shared_disk_names(self) -> dict[str, str]:
        return {"vblora_vector_bank": BANK}

    def after_load(self) -> None:
        """A top-k checkpoint becomes logits: log(w) at the k indices, -inf elsewhere (as peft does)."""
        if not self._staged:
            return
        staged, self._staged = self._staged, {}
        with torch.no_grad():
            for which in "AB":
                w = staged[f"topk_{which}_weights"].float()  # (..., k-1)
                w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)  # (..., k)
                idx = staged[f"topk_{which}_indices"].long()  # (..., k)
                logits = getattr(self, f"vblora_logits_{which}")
                logits.fill_(float("-inf")).scatter_(-1, idx, w.log().to(logits.dtype))
        self._topk_only = True


for _key in _TOPK_KEYS:
    setattr(VBLoRAAdapter, _key, _topk_property(_key))

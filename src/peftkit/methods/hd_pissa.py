"""HD-PiSSA: K PiSSA shards over disjoint principal slices of W, merged into W after every step (arXiv 2505.18777).

Single-machine reading of the authors' multi-GPU scheme (MuLabPKU/HD-PiSSA): K virtual shards on one device.
Shard k holds the SVD triplets [k r, (k+1) r) of the original W: A_k = sqrt(S_k) V_k^T, B_k = U_k sqrt(S_k).
The base keeps the full W (no residual). Each step, micro-batch k (a contiguous slice of the batch rows) gives
shard k its gradients g_B = a' G_k A_k^T, g_A = a' B_k^T G_k (a' = lora_alpha / r); after the optimizer step
`on_step` moves W += a' sum_k (B_k' A_k' - B_k A_k) into the base and resets A_k, B_k to the originals (the
optimizer state is kept, as in the authors' code). So each step changes W by a rank <= 2Kr update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import adapter_dtype, check_alpha, check_rank

__all__ = ["HdPissaConfig", "HdPissaAdapter"]


@register_config
@dataclass(frozen=True, kw_only=True)
class HdPissaConfig(AdapterConfig):
    """r: rank per shard. lora_alpha: a' = lora_alpha / r scales the shards' updates; None (default) means
    lora_alpha = r, i.e. a' = 1 as in the paper (alpha = r = 16), at any r.
    hd_shards: K, the number of virtual shards (each gets its own micro-batch); K * r <= min(out, in)."""

    peft_type: ClassVar[str] = "HD_PISSA"
    method_name: ClassVar[str] = "hd_pissa"

    r: int = 8
    lora_alpha: float | None = None
    hd_shards: int = 2

    def validate(self) -> None:
        check_rank("r", self.r)
        if self.lora_alpha is not None:
            check_alpha("lora_alpha", self.lora_alpha)
        k = self.hd_shards
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4096:
            raise ConfigError("hd_shards", f"must be an integer in [1, 4096], got {k!r}")

    @property
    def scaling(self) -> float:
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.r


@register_adapter("hd_pissa", HdPissaConfig)
class HdPissaAdapter(Adapter):
    """HD-PiSSA (arXiv 2505.18777): y = W x + b + a' sum_k (B_k A_k - B_k0 A_k0) x, zero whenever A, B = A0, B0.

    Value: the sum over every shard and every row (row-independent, so merge and routing are exact). Gradient:
    shard k only from micro-batch k, the k-th of K contiguous slices of the rows it sees (token-wise layers see
    (B*T, in): slices follow batch rows when B % K == 0). on_step: W += a' sum_k (B_k A_k - B_k0 A_k0) via
    shift_base (recorded in the persistent `hd_delta`, so delete/unload restore W and save->load onto the
    original base reproduces it), then A_k, B_k <- A_k0, B_k0. Merge: W' = W + that same delta (zero at a step
    boundary: the trained weight already is the base).
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: HdPissaConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        if ops.kind not in ("linear", "conv1d_transposed", "embedding"):
            raise UnsupportedLayerError(f"hd_pissa supports Linear, Conv1D and Embedding layers, not {ops.kind}")
        k, r, out, inp = config.hd_shards, config.r, ops.out_features, ops.in_features
        if k * r > min(out, inp):
            raise ConfigError("hd_shards", f"hd_shards * r = {k * r} exceeds min(out, in) = {min(out, inp)} of a "
                                           "target layer; lower hd_shards or r")
        dtype, device = adapter_dtype(ops), ops.weight.device
        self.scaling = config.scaling
        self.hd_A = self.new_param((k, r, inp), dtype, device)  # (K, r, in)
        self.hd_B = self.new_param((k, out, r), dtype, device)  # (K, out, r)
        self.register_buffer("hd_A0", torch.zeros_like(self.hd_A))  # (K, r, in), frozen originals
        self.register_buffer("hd_B0", torch.zeros_like(self.hd_B))  # (K, out, r)
        self.register_buffer("hd_delta", torch.zeros(out, inp, dtype=dtype, device=device))  # (out, in) moved into W
        if initialize:
            self._initialize()

    def _initialize(self) -> None:
        """Full SVD of W in fp32; shard k takes the triplets [k r, (k+1) r), sqrt(S) on both sides."""
        k, r = self.hd_A.shape[:2]
        w = self.ops.weight2d().detach().float()  # (out, in)
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (out, m), (m,), (m, in)
        root = sv[:k * r].sqrt()  # (Kr,)
        a = (root[:, None] * vh[:k * r]).reshape(k, r, -1)  # (K, r, in)
        b = (u[:, :k * r] * root).reshape(w.shape[0], k, r).permute(1, 0, 2)  # (K, out, r)
        with torch.no_grad():
            for dst in (self.hd_A, self.hd_A0):
                dst.copy_(a)
            for dst in (self.hd_B, self.hd_B0):
                dst.copy_(b)

    @staticmethod
    def _flat(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Stacked shards as one rank-Kr pair: (Kr, in), (out, Kr), shard-major."""
        return a.reshape(-1, a.shape[-1]), b.permute(1, 0, 2).reshape(b.shape[1], -1)

    def _apply(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return self.ops.up(self.ops.down(x, a), b)  # (..., in) -> (..., r) -> (..., out)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        x = self.cast_input(x, self.hd_A)
        # value: every shard on every row, exactly 0 when A, B equal the originals; it passes dL/dx, not dL/dA
        now = self._apply(x, *self._flat(self.hd_A.detach(), self.hd_B.detach()))  # (..., out)
        value = now - self._apply(x, *self._flat(self.hd_A0, self.hd_B0))  # (..., out)
        parts = x.detach().tensor_split(self.hd_A.shape[0], dim=0)  # K micro-batches: dL/dA_k, dL/dB_k only
        grad = torch.cat([self._apply(p, self.hd_A[k], self.hd_B[k]) for k, p in enumerate(parts)])  # (..., out)
        return self.scaling * (value + (grad - grad.detach()))  # gradient of shard k from micro-batch k only

    def delta_weight(self) -> Tensor:
        a, b = self._flat(self.hd_A.float(), self.hd_B.float())
        a0, b0 = self._flat(self.hd_A0.float(), self.hd_B0.float())
        return self.scaling * (b @ a - b0 @ a0)  # (out, in)

    def on_step(self, step: int) -> list[nn.Parameter] | None:
        """Fold this step's shard updates into W and reset the shards (their optimizer state persists)."""
        with torch.no_grad():
            delta = self.delta_weight()  # (out, in)
            self.shift_base(delta)
            self.hd_delta.add_(delta.to(self.hd_delta.dtype))
            self.hd_A.copy_(self.hd_A0)
            self.hd_B.copy_(self.hd_B0)
        return None

    def after_load(self) -> None:
        """The base given to load_adapter is the original W: hand back what training moved into it."""
        if bool(self.hd_delta.any()):
            self.init_delta = -self.hd_delta.detach().float()  # the host applies W - init_delta = W + dW

    def disk_names(self) -> dict[str, str]:
        return {"hd_A": "hd_pissa_A", "hd_B": "hd_pissa_B", "hd_A0": "hd_pissa_A0", "hd_B0": "hd_pissa_B0",
                "hd_delta": "hd_pissa_delta"}

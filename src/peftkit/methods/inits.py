"""Factor initializers: a frozen weight in, low-rank factors (and the part they take from the base) out.

Every function takes W as (out, in) fp32, the rank r and the adapter scale s, and returns
(A (r, in), B (out, r), taken) where `taken` is None or the (out, in) tensor s*B@A that the base weight must
give up so that the model's function is unchanged (W_res = W - taken). They never modify W.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["init_factors", "parse_init", "check_lora_ga_config", "INIT_NAMES", "LORA_GA_OPTIONS"]

INIT_NAMES = ("True", "False", "gaussian", "pissa", "pissa_niter_<k>", "olora", "nlora", "lora_ga")
# Inits computed from calibration data by their own adapter class (see methods/lora_ga.py), not from W alone.
DATA_INITS = ("lora_ga",)
# peft's LoraGAConfig fields and their allowed values (stable_gamma: a number > 0).
LORA_GA_OPTIONS = {"direction": ("ArB2r", "ArBr", "A2rBr", "random"),
                   "scale": ("stable", "unit", "gd_scale", "weight_svd")}
# peft inits peftkit does not compute; adapters trained with them are plain LoRA on disk and load fine.
LOAD_ONLY_INITS = ("eva", "corda", "loftq", "orthogonal", "mica")

Factors = tuple[Tensor, Tensor, Tensor | None]


def kaiming_zero(w: Tensor, r: int, s: float) -> Factors:
    """LoRA default: A ~ kaiming-uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    a = torch.empty(r, w.shape[1])
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros(w.shape[0], r), None


def embedding_default(w: Tensor, r: int, s: float) -> Factors:
    """LoRA on embeddings swaps roles: A = 0, B ~ N(0, 1)."""
    return torch.zeros(r, w.shape[1]), torch.randn(w.shape[0], r), None


def random_both(w: Tensor, r: int, s: float) -> Factors:
    """init_lora_weights=False: both factors random (not an identity at init; for tests and debugging)."""
    a, _, _ = kaiming_zero(w, r, s)
    b = torch.empty(w.shape[0], r)
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return a, b, None


def gaussian(w: Tensor, r: int, s: float) -> Factors:
    """A ~ N(0, (1/r)^2), B = 0."""
    return torch.randn(r, w.shape[1]) / r, torch.zeros(w.shape[0], r), None


def _split_sv(u: Tensor, sv: Tensor, vh: Tensor, s: float) -> Factors:
    root = torch.sqrt(sv / s)  # (r,)
    a = root[:, None] * vh  # (r, in)
    b = u * root[None, :]  # (out, r)
    return a, b, s * (b @ a)


def pissa(w: Tensor, r: int, s: float, niter: int | None = None) -> Factors:
    """PiSSA (arXiv 2404.02948): s*B@A = U_r S_r V_r^T, split as sqrt(S/s) on both sides; base keeps the rest.

    niter=None: full SVD; niter=k: randomized SVD (torch.svd_lowrank) with k power iterations.
    """
    if niter is None:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        return _split_sv(u[:, :r], sv[:r], vh[:r], s)
    u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)  # (out, r), (r,), (in, r)
    return _split_sv(u, sv, v.T, s)


def olora(w: Tensor, r: int, s: float) -> Factors:
    """OLoRA (arXiv 2406.01775): thin QR W = QR, B = Q[:, :r], A = R[:r]; base keeps W - s*B@A."""
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, s * (b @ a)


def nlora(w: Tensor, r: int, s: float) -> Factors:
    """Nystrom (arXiv 2502.14482) with index sets = first r rows/cols: B A = W[:, I] pinv(W[I, I]) W[I, :].

    The middle factor is folded into A (A = pinv(W_II) W_I: / s), so the adapter stays two-factor LoRA.
    """
    b = w[:, :r].clone()  # (out, r)
    a = torch.linalg.pinv(w[:r, :r], rtol=1e-6) @ w[:r, :] / s  # (r, in)
    return a, b, s * (b @ a)


def parse_init(value: bool | str) -> tuple[str, int | None]:
    """Validate `init_lora_weights` and return (kind, niter)."""
    if value is True or value is False:
        return str(value), None
    if value in ("gaussian", "pissa", "olora", "nlora", *DATA_INITS, *LOAD_ONLY_INITS):
        return value, None
    m = re.fullmatch(r"pissa_niter_(\d+)", str(value))
    if m:
        return "pissa", int(m.group(1))
    raise ConfigError("init_lora_weights", f"unknown init {value!r}; choose one of {INIT_NAMES}")


def check_lora_ga_config(value: dict | None) -> None:
    """Validate `lora_ga_config`: None (defaults) or a dict of peft's LoraGAConfig fields."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError("lora_ga_config", f"must be a dict or None, got {type(value).__name__}")
    unknown = sorted(set(value) - {*LORA_GA_OPTIONS, "stable_gamma"})
    if unknown:
        raise ConfigError("lora_ga_config", f"unknown keys {unknown}; valid: direction, scale, stable_gamma")
    for key, allowed in LORA_GA_OPTIONS.items():
        if key in value and value[key] not in allowed:
            raise ConfigError("lora_ga_config", f"{key}={value[key]!r} is not one of {allowed}")
    gamma = value.get("stable_gamma", 16)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ConfigError("lora_ga_config", f"stable_gamma must be a finite number > 0, got {gamma!r}")


def init_factors(value: bool | str, w: Tensor, r: int, s: float, embedding: bool = False) -> Factors:
    """Dispatch on `init_lora_weights`. SVD/QR-based inits need r <= min(out, in)."""
    kind, niter = parse_init(value)
    if kind in DATA_INITS:
        raise ConfigError("init_lora_weights", f"init {value!r} is computed from calibration data by its own method; "
                                               "build the adapter through AdapterModel.add_adapter(calibration=...)")
    if kind in LOAD_ONLY_INITS:
        raise ConfigError("init_lora_weights", f"init {value!r} can be loaded from disk but peftkit does not compute "
                                               f"it; to train a new adapter choose one of {INIT_NAMES}")
    if kind in ("pissa", "olora", "nlora") and r > min(w.shape):
        raise ConfigError("r", f"r={r} exceeds min(out, in)={min(w.shape)}, the most that init {value!r} "
                               "can take from this layer; lower r or use rank_pattern for it")
    w = w.detach().float()
    table = {"True": embedding_default if embedding else kaiming_zero, "False": random_both, "gaussian": gaussian,
             "olora": olora, "nlora": nlora}
    if kind == "pissa":
        return pissa(w, r, s, niter)
    return table[kind](w, r, s)

"""ServingModel: a base causal LM whose adapted layers compute many adapters per forward with the batched op.

The union of the registered adapters' target modules is wrapped in `core.host.AdaptedLayer` hosts that hold no
adapter modules; they share one `Routing` whose `executor` is this model. A forward sets ONE routing plan (rows ->
slots) and ONE slot table (slot -> lowered adapter) for the whole batch; every host reads them: base matmul for
all rows, then `ops.adapter_op` for the adapter part (ARCHITECTURE principles 2 and 10).

Adapters reach this code only through the registry and the Adapter interface: each is rebuilt per layer from its
config (`get_method(config.method).adapter_cls`, never a method name), loaded, and lowered to `LowRank`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..checkpoint.peft_format import PREFIX, WEIGHTS_NAME
from ..core.adapter import AdapterContext, LowRank
from ..core.host import AdaptedLayer, Routing
from ..core.inject import find_targets
from ..core.layers import ops_for
from ..core.registry import get_method
from ..errors import ConfigError, CorruptCheckpointError, ShapeMismatchError
from .ops import BACKENDS, RoutingPlan, Slots, adapter_op
from .store import AdapterStore, StoredAdapter

__all__ = ["ServingModel", "Lowered"]

Lowered = dict[str, LowRank]  # layer path -> the adapter's lowered form on that layer
_TOKEN_WISE = ("linear", "conv1d_transposed")


class ServingModel:
    """Wraps a HF causal LM (`model`, frozen, eval) for serving; `backend` picks the op ("auto" default:
    segment for few adapters per forward, grouped GEMM for many)."""

    def __init__(self, model: nn.Module, *, backend: str = "auto", dtype: torch.dtype | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError("backend", f"unknown op back end {backend!r}; use one of {BACKENDS}")
        self.model = model.eval().requires_grad_(False)
        self.backend = backend
        self.dtype = dtype or next(model.parameters()).dtype  # lowered factors are stored in this dtype
        self.routing = Routing()
        self.routing.executor = self._execute
        self._paths: dict[int, str] = {}  # id(host) -> path
        self._plan: RoutingPlan | None = None
        self._slots: Slots | None = None
        self._target_memo: dict[str, frozenset[str]] = {}
        self._lock = threading.RLock()  # registration (server thread) walks the model; ensure_hosts changes it

    @property
    def config(self):
        return self.model.config

    # --- registration-time checks (cheap: no tensor data) -----------------------------------------------------
    def targets(self, config) -> frozenset[str]:
        key = repr((config.target_modules, config.exclude_modules, config.layers_to_transform,
                    config.layers_pattern))
        with self._lock:
            if key not in self._target_memo:
                self._target_memo[key] = frozenset(find_targets(self.model, config))
            return self._target_memo[key]

    def check(self, item: StoredAdapter) -> None:
        """Can this adapter be served batched on this model? Raises naming the file and the fix."""
        where, config = str(item.path / WEIGHTS_NAME), item.config
        cls = get_method(config.method).adapter_cls
        if "servable" not in cls.capabilities:
            raise ConfigError("method", f"{where}: {config.method!r} adapters have no lowered (low-rank + channel "
                              "scale) form, so they cannot be batched; merge the adapter into the base "
                              "(`peftkit merge`) and serve the merged model instead")
        if config.modules_to_save or config.bias != "none":
            raise ConfigError("modules_to_save" if config.modules_to_save else "bias",
                              f"{where}: trained module copies or base biases change the shared base model and "
                              "cannot be served per request; merge the adapter instead")
        targets = self.targets(config)
        if not targets:
            raise ConfigError("target_modules", f"{where}: the adapter's target_modules match no module of the "
                              "base model; it was trained for a different architecture")
        for key in item.index:
            if key.startswith(PREFIX) and not _under_target(key[len(PREFIX):], targets):
                raise CorruptCheckpointError(f"{where}: {key} matches no adapted module of this base model; "
                                             "check target_modules or the base model")

    # --- lowering (first use; may run on the prefetch thread: reads base weights, never changes the model) -------
    def lower(self, store: AdapterStore, name: str) -> tuple[Lowered, int]:
        """Load adapter `name` from the store and lower it per layer; (lowered, bytes)."""
        item, tensors = store.load(name)
        where, config = str(item.path / WEIGHTS_NAME), item.config
        cls = get_method(config.method).adapter_cls
        targets, shared, used, out = sorted(self.targets(config)), {}, set(), {}
        for path in targets:
            ops = ops_for(self._base(path), path)
            if ops.kind not in _TOKEN_WISE:
                raise ConfigError("target_modules", f"{where}: {path} is a {ops.kind} layer; the serving model "
                                  "batches Linear/Conv1D targets only; merge this adapter instead")
            adapter = cls(ops, config.for_module(path), initialize=False,
                          ctx=AdapterContext(path, tuple(targets), shared))
            names = {p: f"{PREFIX}{path}.{s}" for p, s in adapter.disk_names().items()}
            names |= {a: f"base_model.{s}" for a, s in adapter.shared_disk_names().items()}
            _copy_in(adapter, names, tensors, where)
            used.update(names.values())
            adapter.after_load()
            out[path] = self._lowered(adapter, path, where)
        unused = sorted(set(tensors) - used)
        if unused:
            raise CorruptCheckpointError(f"{where}: {len(unused)} key(s) match no adapted module, e.g. {unused[:3]}")
        nbytes = sum(t.numel() * t.element_size() for low in out.values() for t in _tensors(low))
        return out, nbytes

    def _lowered(self, adapter, path: str, where: str) -> LowRank:
        if adapter.init_delta is not None:
            raise ConfigError("init_lora_weights", f"{where}: this adapter changed the base weights at init "
                              f"({path}); save it with original_base=True (convert_to_original_base) to serve it")
        with torch.no_grad():
            low = adapter.lowered()
        if low is None:
            raise ConfigError("method", f"{where}: {path}: the adapter returned no lowered form")
        cast = (lambda t: None if t is None else t.detach().to(self.dtype).contiguous())  # noqa: E731
        return LowRank(cast(low.a), cast(low.b), float(low.scale), out_scale=cast(low.out_scale),
                       bias=cast(low.bias))

    def _base(self, path: str) -> nn.Module:
        module = self.model.get_submodule(path)
        return module.base_layer if isinstance(module, AdaptedLayer) else module

    # --- forward ----------------------------------------------------------------------------------------------
    def ensure_hosts(self, paths) -> None:
        """Wrap target modules that are not hosts yet (engine thread only, between forwards)."""
        with self._lock:
            for path in paths:
                module = self.model.get_submodule(path)
                if not isinstance(module, AdaptedLayer):
                    host = AdaptedLayer(module, ops_for(module, path), self.routing)
                    self.model.set_submodule(path, host)
                    self._paths[id(host)] = path

    def forward(self, row_slots: Sequence[int], slots: Slots, **kwargs):
        """One forward of the HF model; row i of input_ids uses slot row_slots[i] (-1 = base)."""
        self.ensure_hosts({p for s in slots.per_slot for p in s})
        batch, length = kwargs["input_ids"].shape
        if len(row_slots) != batch:
            raise ValueError(f"row_slots has {len(row_slots)} entries for a batch of {batch} rows")
        self._plan = RoutingPlan.from_rows(row_slots, length, kwargs["input_ids"].device)
        self._slots = slots
        self.routing.rows = tuple(str(s) for s in row_slots)
        try:
            with torch.inference_mode():
                return self.model(**kwargs)
        finally:
            self.routing.rows, self._plan, self._slots = None, None, None

    def _execute(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        """Routing.executor: the batched op on this layer, (B, T, in) -> (B, T, out)."""
        path = self._paths[id(layer)]
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])  # (N, in), (N, out)
        return adapter_op(self.backend, layer.ops, path, x2, y2, self._plan, self._slots).view(y.shape)


def _under_target(rest: str, targets: frozenset[str]) -> bool:
    parts = rest.split(".")
    return any(".".join(parts[:i]) in targets for i in range(1, len(parts)))


def _copy_in(adapter: nn.Module, names: dict[str, str], tensors: dict[str, Tensor], where: str) -> None:
    with torch.no_grad():
        for attr, key in names.items():
            if key not in tensors:
                raise CorruptCheckpointError(f"{where}: missing key {key}; the file does not match this model "
                                             "and adapter config")
            dest = getattr(adapter, attr)
            if tuple(dest.shape) != tuple(tensors[key].shape):
                raise ShapeMismatchError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                                         f"{tuple(dest.shape)}; the adapter was trained on a different base model")
            dest.copy_(tensors[key])


def _tensors(low: LowRank) -> list[Tensor]:
    return [t for t in (low.a, low.b, low.out_scale, low.bias) if t is not None]

"""AdapterStore: adapters registered by name from PEFT-format directories, read lazily.

Registration reads adapter_config.json and only the safetensors *header* (the JSON index at the start of the
file: names, dtypes, shapes, offsets), so registering 1000 adapters takes well under a second of I/O; the tensors
are read (and fully validated: integrity, float dtypes, finite values) on first use by `load`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..checkpoint.config_json import config_from_json
from ..checkpoint.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from ..core.config import AdapterConfig
from ..core.registry import get_method
from ..errors import AdapterNameError, CheckpointError, CorruptCheckpointError

__all__ = ["AdapterStore", "StoredAdapter", "check_serving_name"]

_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER = 100 << 20


def check_serving_name(name: str) -> None:
    """Adapter names are identifiers, never paths: no separators, no '..', no leading '.' or '__'."""
    ok = isinstance(name, str) and _NAME_RE.fullmatch(name) and ".." not in name and not name.startswith("__")
    if not ok:
        raise AdapterNameError(f"adapter name {name!r} is invalid; use letters, digits, '_', '-' or '.' (no path "
                               "separators, no '..', no leading '.' or '__', at most 200 characters)")


@dataclass(frozen=True)
class StoredAdapter:
    """What registration learned: the config and the tensor index {key: (dtype, shape)}, no tensor data."""

    name: str
    path: Path
    config: AdapterConfig
    index: dict[str, tuple[str, tuple[int, ...]]]
    nbytes: int

    @property
    def method(self) -> str:
        return self.config.method


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The safetensors index {key: (dtype, shape)}, checked against the file size; the data is not read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({e}); it is corrupt or truncated, "
                                     "save the adapter again") from e
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, info in header.items():
        dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in _FLOAT_DTYPES:
            raise CorruptCheckpointError(f"{path}: {key} has dtype {dtype}; adapters hold float tensors")
        numel = 1
        for d in shape:
            numel *= d
        if hi - lo != numel * _FLOAT_DTYPES[dtype]:
            raise CorruptCheckpointError(f"{path}: {key} offsets do not match its shape; the file is corrupt")
        out[key], end = (dtype, shape), max(end, hi)
    if 8 + n + end > size:
        raise CorruptCheckpointError(f"{path}: truncated ({size} bytes, the index needs {8 + n + end}); save the "
                                     "adapter again")
    return out


class AdapterStore:
    """name -> adapter directory, registered lazily. Thread-safe (the server registers while the engine runs).

    check: optional callable(StoredAdapter) run at registration (the serving model checks that the method can be
    served and that the keys name modules of the base model), raising an error that names the file.
    """

    def __init__(self, check: Callable[[StoredAdapter], None] | None = None) -> None:
        self._items: dict[str, StoredAdapter] = {}
        self._lock = threading.RLock()
        self.check = check
        self.version = 0  # bumped on every change; caches drop entries of names re-registered since

    def register(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> StoredAdapter:
        """Index adapter directory `path` under `name`; errors name the file and the fix."""
        check_serving_name(name)
        directory = Path(path)
        cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights_path.is_file():
            missing = CONFIG_NAME if not cfg_path.is_file() else WEIGHTS_NAME
            raise CheckpointError(f"{directory}: no {missing}; an adapter directory holds {CONFIG_NAME} and "
                                  f"{WEIGHTS_NAME} (pickle files are never loaded)")
        try:
            data = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{cfg_path}: invalid JSON ({e}); the file is corrupt or truncated") from e
        config = config_from_json(data, str(cfg_path))
        get_method(config.method)
        index = read_header(weights_path)
        nbytes = sum(_FLOAT_DTYPES[d] * _numel(s) for d, s in index.values())
        item = StoredAdapter(name, directory, config, index, nbytes)
        if self.check is not None:
            self.check(item)
        with self._lock:
            if name in self._items and not replace:
                raise AdapterNameError(f"adapter {name!r} is already registered; unregister it first")
            self._items[name] = item
            self.version += 1
        return item

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._items:
                raise KeyError(self._unknown(name))
            del self._items[name]
            self.version += 1

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> StoredAdapter:
        with self._lock:
            if name not in self._items:
                raise KeyError(self._unknown(name))
            return self._items[name]

    def load(self, name: str) -> tuple[StoredAdapter, dict[str, Tensor]]:
        """Read the tensors now (full validation: integrity, dtypes, finite values)."""
        item = self.get(name)
        _, tensors = read_adapter(item.path)
        return item, tensors

    def _unknown(self, name: str) -> str:
        known = self.names()
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        return f"unknown adapter {name!r}; registered adapters: {shown or 'none'}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

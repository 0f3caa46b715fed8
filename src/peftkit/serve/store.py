"""AdapterStore: adapters registered by name from PEFT-format directories, read lazily."""

from __future__ import annotations

__all__ = ["AdapterStore"]


class AdapterStore:
    """name -> adapter directory. register(name, path) reads only adapter_config.json and the safetensors
    header; tensors load on first use. unregister(name), names()."""

    def register(self, name: str, path) -> None:
        raise NotImplementedError

    def unregister(self, name: str) -> None:
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

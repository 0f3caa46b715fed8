"""Build and run the HTTP server: `peftkit serve` glue, and uvicorn on a background thread (tests, benchmarks).

Adapters named on the command line (`--adapters NAME=PATH` or a bare PATH, named after its directory) are the
operator's choice and load at startup; adapters loaded at runtime over HTTP must lie under an `--adapter-root`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AssetMissingError, ConfigError
from .security import RequestError, check_adapter_name

__all__ = ["ServeOptions", "parse_adapter_specs", "build_app", "ThreadedServer"]


@dataclass
class ServeOptions:
    """What `peftkit serve` needs; field names match its flags."""

    base: str | None = None
    adapters: list[str] = field(default_factory=list)
    adapter_root: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_adapters_per_step: int = 8
    cache_bytes: int = 1 << 30
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    dtype: str = "float32"


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """["sql=/a/sql", "/a/chat"] -> {"sql": Path("/a/sql"), "chat": Path("/a/chat")}; ConfigError on bad input."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        try:
            check_adapter_name(name, "--adapters")
        except RequestError as e:
            raise ConfigError("--adapters", f"{spec!r}: {e.message}") from None
        if name in out:
            raise ConfigError("--adapters", f"adapter name {name!r} is given twice; use NAME=PATH to rename one")
        if not Path(path).is_dir():
            raise ConfigError("--adapters", f"{spec!r}: {path!r} is not a directory (expected a PEFT-format "
                              "adapter directory with adapter_config.json)")
        out[name] = Path(path).resolve()
    return out


def _served_name(opts: ServeOptions) -> str:
    from ..assets import DEFAULT_MODEL

    if opts.served_model_name:
        return opts.served_model_name
    if opts.base is None:
        return DEFAULT_MODEL
    return Path(opts.base).name if Path(opts.base).exists() else opts.base


def _require_server_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetMissingError(f"serving needs {missing}; install them with: pip install 'peftkit[server]'")


def build_app(opts: ServeOptions) -> Any:
    """Load the base model (the embedded default when `opts.base` is None), register the adapters, and return
    the FastAPI app (the engine thread starts with the app's lifespan)."""
    _require_server_extra()
    import torch

    from ..assets import DEFAULT_MODEL, load_model
    from .engine import Engine
    from .security import resolve_roots
    from .server import create_app
    from .store import AdapterStore

    adapters = parse_adapter_specs(opts.adapters)
    try:
        resolve_roots(opts.adapter_root)
    except NotADirectoryError as e:
        raise ConfigError("--adapter-root", f"{e}; create it or fix the path") from None
    dtype = getattr(torch, opts.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError("--dtype", f"{opts.dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    model, tokenizer = load_model(opts.base or DEFAULT_MODEL, "causal_lm", dtype=dtype)
    store = AdapterStore()
    for name, path in adapters.items():
        store.register(name, str(path))
    engine = Engine(model, store, max_batch=opts.max_batch, max_adapters_per_step=opts.max_adapters_per_step,
                    cache_bytes=opts.cache_bytes)
    return create_app(engine, tokenizer, adapter_roots=opts.adapter_root, served_model_name=_served_name(opts),
                      max_prompt_tokens=opts.max_prompt_tokens, max_new_tokens=opts.max_new_tokens,
                      adapter_paths={k: str(v) for k, v in adapters.items()})


def run(opts: ServeOptions) -> None:
    """Serve until interrupted (uvicorn on opts.host:opts.port)."""
    import uvicorn

    app = build_app(opts)
    print(f"peftkit serve: http://{opts.host}:{opts.port}/v1 (models: GET /v1/models)", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level=os.environ.get("PEFTKIT_LOG_LEVEL", "info"))


class ThreadedServer:
    """uvicorn serving `app` on a background thread; `url` is known once started. A context manager."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="peftkit-uvicorn", daemon=True)
        self.host = host
        self.url = ""

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

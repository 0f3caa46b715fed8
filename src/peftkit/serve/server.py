"""OpenAI-compatible HTTP server over the engine (FastAPI; run with uvicorn, e.g. `peftkit serve`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (the `model` field picks the adapter, as in vLLM;
the served base name means no adapter; `"stream": true` sends SSE `data: {...}` chunks then `data: [DONE]`),
GET /v1/models, POST /v1/load_lora_adapter {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter
{"lora_name"}, GET /health, GET /metrics (Prometheus text; `?format=json` for JSON).

Client errors are 4xx with an OpenAI-style {"error": {"message", "type", "param", "code"}} body: malformed JSON
400, bad fields 422, bad adapter names 400, unknown adapters 404, oversized prompts 400, oversized bodies 413,
paths outside the adapter roots 403. One background thread (`EngineThread`) owns the engine.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PeftkitError
from . import protocol as wire
from .engine_thread import EngineThread
from .jobs import Job, start_job
from .security import RequestError, check_adapter_name, resolve_adapter_dir, resolve_roots

__all__ = ["create_app", "ServerState"]

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/metrics")


class ServerState:
    """Everything the handlers share: the engine thread, the tokenizer, the adapter table, limits, counters."""

    def __init__(self, engine: Any, tokenizer: Any, *, adapter_roots: Iterable[str | os.PathLike],
                 served_model_name: str, max_prompt_tokens: int, max_new_tokens: int, default_max_tokens: int,
                 max_body_bytes: int) -> None:
        self.runner = EngineThread(engine)
        self.engine = engine
        self.tokenizer = tokenizer
        self.roots = resolve_roots(adapter_roots)
        self.served_model_name = served_model_name
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.vocab_size = len(tokenizer)
        self.created = int(time.time())
        self.adapters: dict[str, str] = {name: "" for name in engine.store.names()}
        self.inflight: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def adapter_for(self, model: str) -> str | None:
        """The adapter `model` names (None = the base model): 400 for unsafe names, 404 for unknown ones."""
        if model == self.served_model_name:
            return None
        name = check_adapter_name(model, "model")
        if name not in self.adapters:
            raise RequestError(404, f"model {name!r} does not exist; available: "
                               f"{[self.served_model_name, *sorted(self.adapters)]} (GET /v1/models), or load it "
                               "with POST /v1/load_lora_adapter", "model")
        return name

    def stop_ids(self, request: wire._Generation) -> tuple[int, ...]:
        ids = list(request.stop_token_ids or [])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and not request.ignore_eos:
            ids.append(eos)
        return tuple(dict.fromkeys(ids))

    def check_prompt(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise RequestError(400, f"{field}: the prompt is empty", field)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(400, f"{field}: the prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.max_prompt_tokens} (shorten the prompt)", field)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise RequestError(400, f"{field}: token ids must lie in [0, {self.vocab_size})", field)
        return ids

    def max_tokens(self, *values: int | None, default: int) -> int:
        n = next((v for v in values if v is not None), default)
        if n > self.max_new_tokens:
            raise RequestError(400, f"max_tokens: {n} is more than this server's limit of {self.max_new_tokens}",
                               "max_tokens")
        return n


def create_app(engine: Any, tokenizer: Any, *, adapter_roots: Iterable[str | os.PathLike] = (),
               served_model_name: str = "base", max_prompt_tokens: int = 4096, max_new_tokens: int = 1024,
               default_max_tokens: int = 16, max_body_bytes: int = 1 << 20,
               adapter_paths: dict[str, str] | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (its store's adapters are servable at once).

    adapter_roots: directories runtime loads may read from (none: runtime loading is refused).
    max_prompt_tokens / max_new_tokens: per-request limits; default_max_tokens: max_tokens when a completion
    request omits it (chat requests default to max_new_tokens). adapter_paths: shown by /v1/models.
    """
    state = ServerState(engine, tokenizer, adapter_roots=adapter_roots, served_model_name=served_model_name,
                        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                        default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes)
    state.adapters.update({k: str(v) for k, v in (adapter_paths or {}).items() if k in state.adapters})

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.runner.start()
        try:
            yield
        finally:
            state.runner.stop()

    app = FastAPI(title="peftkit", lifespan=lifespan)
    app.state.peftkit = state
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_count_requests)
    for path, handler, method in ((ROUTES[0], completions, "POST"), (ROUTES[1], chat_completions, "POST"),
                                  (ROUTES[2], models, "GET"), (ROUTES[3], load_adapter, "POST"),
                                  (ROUTES[4], unload_adapter, "POST"), (ROUTES[5], health, "GET"),
                                  (ROUTES[6], metrics, "GET")):
        app.add_api_route(path, handler, methods=[method])
    return app


# --- plumbing -----------------------------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
    return request.app.state.peftkit


async def _request_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return JSONResponse(wire.error_body(exc.status, exc.message, exc.param), status_code=exc.status)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(wire.error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _count_requests(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    path = request.url.path if request.url.path in ROUTES else "other"
    _state(request).counters[f'http_requests_total{{path="{path}",status="{response.status_code}"}}'] += 1
    return response


async def _json_body(request: Request) -> Any:
    """The request body as JSON: 413 past the size limit, 400 when it is not a JSON object."""
    limit = _state(request).max_body_bytes
    declared = request.headers.get("content-length", "")
    too_big = RequestError(413, f"the request body is larger than {limit} bytes; send a shorter prompt")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return data


# --- generation ---------------------------------------------------------------------------------------------
def _prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """A completion request's prompt(s) as token ids: a string, a list of strings, ids, or lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(i, int) for i in prompt):
        prompt = [prompt]
    if not prompt:
        raise RequestError(400, "prompt: the prompt is empty", "prompt")
    out = []
    for p in prompt:
        ids = state.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        out.append(state.check_prompt(ids, "prompt"))
    return out


def _chat_prompt(state: ServerState, request: wire.ChatRequest) -> list[int]:
    if not getattr(state.tokenizer, "chat_template", None):
        raise RequestError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                           "messages")
    messages = [m.as_template_input() for m in request.messages]
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001  (template errors are the request's messages)
        raise RequestError(400, f"messages: the chat template rejected the messages ({e})", "messages") from None
    return state.check_prompt(state.tokenizer(text, add_special_tokens=False)["input_ids"], "messages")


async def completions(request: Request) -> Response:
    state = _state(request)
    req = wire.parse(wire.CompletionRequest, await _json_body(request))
    req.check_supported()
    adapter = state.adapter_for(req.model)
    max_tokens = state.max_tokens(req.max_tokens, default=state.default_max_tokens)
    job = Job(state, "cmpl", "text_completion", req, adapter, _prompts(state, req.prompt), max_tokens)
    return await _respond(job, req.stream)


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    req = wire.parse(wire.ChatRequest, await _json_body(request))
    req.check_supported()
    adapter = state.adapter_for(req.model)
    max_tokens = state.max_tokens(req.max_completion_tokens, req.max_tokens, default=state.max_new_tokens)
    job = Job(state, "chatcmpl", "chat.completion", req, adapter, [_chat_prompt(state, req)], max_tokens)
    return await _respond(job, req.stream)


async def _respond(job: Job, stream: bool) -> Response:
    await start_job(job)
    if stream:
        return StreamingResponse(job.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return JSONResponse(await job.collect())
    finally:
        job.close()


# --- adapters and status ------------------------------------------------------------------------------------
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    base = {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "peftkit",
            "root": state.served_model_name, "parent": None, "max_model_len": state.max_prompt_tokens}
    adapters = [{"id": name, "object": "model", "created": state.created, "owned_by": "peftkit",
                 "root": path or name, "parent": state.served_model_name}
                for name, path in sorted(state.adapters.items())]
    return {"object": "list", "data": [base, *adapters]}


async def load_adapter(request: Request) -> dict[str, Any]:
    state, data = _state(request), await _json_body(request)
    name = check_adapter_name(data.get("lora_name"), "lora_name")
    if name in state.adapters or name == state.served_model_name:
        raise RequestError(400, f"lora_name {name!r} is already in use; unload it first or pick another name",
                           "lora_name")
    path = resolve_adapter_dir(data.get("lora_path"), state.roots)
    try:
        await state.runner.run(state.engine.store.register, name, str(path))
    except (PeftkitError, ValueError, KeyError, OSError) as e:  # checkpoint errors name the file
        raise RequestError(400, f"lora_path: cannot load adapter {name!r}: {e}", "lora_path") from None
    state.adapters[name] = str(path)
    state.counters["adapter_loads_total"] += 1
    return {"status": "loaded", "lora_name": name, "lora_path": str(path)}


async def unload_adapter(request: Request) -> dict[str, Any]:
    state, data = _state(request), await _json_body(request)
    name = check_adapter_name(data.get("lora_name"), "lora_name")
    if name not in state.adapters:
        raise RequestError(404, f"lora_name {name!r} is not loaded; loaded: {sorted(state.adapters)}", "lora_name")
    if state.inflight[name]:
        raise RequestError(409, f"adapter {name!r} has {state.inflight[name]} request(s) in flight; retry when "
                           "they finish", "lora_name")
    await state.runner.run(state.engine.store.unregister, name)
    del state.adapters[name]
    state.counters["adapter_unloads_total"] += 1
    return {"status": "unloaded", "lora_name": name}


async def health(request: Request) -> JSONResponse:
    runner = _state(request).runner
    body = {"status": "ok" if runner.alive else "unavailable", "engine_steps": runner.steps,
            "step_errors": runner.step_errors, "last_error": runner.last_error}
    return JSONResponse(body, status_code=200 if runner.alive else 503)


async def metrics(request: Request) -> Response:
    state = _state(request)
    try:
        stats = await state.runner.run(state.engine.stats, timeout=10.0)
    except Exception as e:  # noqa: BLE001  (metrics still report the server's own counters)
        stats = {"stats_error": 1}
        state.counters[f'engine_stats_errors_total{{type="{type(e).__name__}"}}'] += 1
    values: dict[str, float] = {"engine_steps_total": state.runner.steps,
                                "engine_step_errors_total": state.runner.step_errors,
                                "adapters_loaded": len(state.adapters),
                                "requests_in_flight": sum(state.inflight.values()), **state.counters}
    values.update({f"engine_{k}": v for k, v in _flatten(stats).items()})
    if request.query_params.get("format") == "json":
        return JSONResponse(values)
    lines = [f"peftkit_{key} {float(value):g}" for key, value in sorted(values.items())]  # families grouped
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _flatten(stats: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested stats dict as {"a_b": value}."""
    out: dict[str, float] = {}
    for key, value in (stats or {}).items():
        name = f"{prefix}{key}".replace(".", "_").replace("-", "_").replace(" ", "_")
        if isinstance(value, dict):
            out.update(_flatten(value, name + "_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


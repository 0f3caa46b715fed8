"""One HTTP generation request as engine requests (one per prompt), their event queue and their text.

A Job is created by a handler after validation, started on the engine thread, then read either whole
(`collect`) or as server-sent events (`sse`). `close` is idempotent: it stops listening, aborts whatever the
engine still runs for this job (a client that disconnects mid-stream, a stop string), and updates counters.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from . import protocol as wire
from .security import RequestError
from .types import GenerationRequest

__all__ = ["Job", "EngineFailure", "start_job"]


class EngineFailure(Exception):
    """The engine ended a request with finish_reason "error: ..."."""


class Job:
    def __init__(self, state: Any, prefix: str, kind: str, request: Any, adapter: str | None,
                 prompts: list[list[int]], max_tokens: int) -> None:
        self.state = state
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.chat = kind.startswith("chat")
        self.head = {"id": self.id, "object": kind, "created": int(time.time()), "model": request.model}
        self.adapter = adapter
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stops, stop_ids = request.stop_strings(), state.stop_ids(request)
        self.requests = [GenerationRequest(f"{self.id}-{i}", ids, adapter, max_tokens, stop_ids)
                         for i, ids in enumerate(prompts)]
        self.index = {r.request_id: i for i, r in enumerate(self.requests)}
        self.texts = [wire.TextStream(state.tokenizer, stops) for _ in prompts]
        self.finish: list[str | None] = [None] * len(prompts)
        self.generated = [0] * len(prompts)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = self.closed = False

    # --- reading events -------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) until every choice has finished."""
        pending = set(range(len(self.requests)))
        while pending:
            event = await self.queue.get()
            i = self.index.get(event.request_id)
            if i is None or i not in pending:
                continue
            if (event.finish_reason or "").startswith("error"):
                raise EngineFailure(f"generation failed: {event.finish_reason}")
            text = self.texts[i]
            delta = ""
            if event.token_id is not None and not text.stopped:
                self.generated[i] += 1
                delta = text.push(event.token_id)
            finish = "stop" if text.stopped else (event.finish_reason if event.finished else None)
            if finish is not None:
                delta += text.flush()
                pending.discard(i)
                self.finish[i] = finish
                if not event.finished:  # a stop string ended it: the engine need not go on
                    self._abort([event.request_id])
            if delta or finish is not None:
                yield i, delta, finish

    def usage(self) -> dict[str, int]:
        return wire.usage(sum(len(r.prompt_ids) for r in self.requests), sum(self.generated))

    async def collect(self) -> dict[str, Any]:
        """The whole response body (non-streaming)."""
        parts: list[list[str]] = [[] for _ in self.requests]
        try:
            async for i, delta, _ in self.events():
                parts[i].append(delta)
        except EngineFailure as e:
            raise RequestError(500, str(e)) from None
        make = wire.chat_choice if self.chat else wire.completion_choice
        choices = [make(i, "".join(p), self.finish[i]) for i, p in enumerate(parts)]
        return {**self.head, "choices": choices, "usage": self.usage()}

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: one `data: {chunk}` per new piece of text, then `data: [DONE]`."""
        head = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion"}
        try:
            if self.chat:
                yield wire.sse({**head, "choices": [wire.chat_delta(0, "", None, first=True)]})
            async for i, delta, finish in self.events():
                choice = wire.chat_delta(i, delta, finish) if self.chat else wire.completion_choice(i, delta, finish)
                yield wire.sse({**head, "choices": [choice]})
            if self.include_usage:
                yield wire.sse({**head, "choices": [], "usage": self.usage()})
        except EngineFailure as e:
            yield wire.sse(wire.error_body(500, str(e)))
        finally:
            self.close()
        yield wire.sse("[DONE]")

    # --- lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed or not self.started:
            return
        self.closed = True
        state = self.state
        for r in self.requests:
            state.runner.forget(r.request_id)
        self._abort([r.request_id for i, r in enumerate(self.requests) if self.finish[i] is None])
        state.inflight[self.adapter or ""] -= 1
        state.counters["generation_tokens_total"] += sum(self.generated)
        for finish in self.finish:
            state.counters[f'finished_total{{reason="{finish or "abort"}"}}'] += 1

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.state.runner.call(_abort_all, self.state.engine, request_ids)


def _add_all(engine: Any, requests: list[GenerationRequest]) -> None:
    for r in requests:
        engine.add_request(r)


def _abort_all(engine: Any, request_ids: list[str]) -> None:
    for request_id in request_ids:
        try:
            engine.abort(request_id)
        except Exception:  # noqa: BLE001, S110  (it finished meanwhile)
            pass


async def start_job(job: Job) -> None:
    """Hand the job's requests to the engine: 404 when its adapter vanished, 400 when the engine refuses them."""
    state = job.state
    state.inflight[job.adapter or ""] += 1
    job.started = True
    for r in job.requests:
        state.runner.listen(r.request_id, job.queue)
    try:
        await state.runner.run(_add_all, state.engine, job.requests)
    except KeyError as e:
        job.close()
        raise RequestError(404, f"model {job.adapter!r} is not available: {e}", "model") from None
    except (ValueError, TypeError) as e:
        job.close()
        raise RequestError(400, f"the engine refused the request: {e}") from None
    except RuntimeError as e:
        job.close()
        raise RequestError(503, f"the server cannot generate right now: {e}") from None
    state.counters["requests_total"] += 1
    state.counters["prompt_tokens_total"] += sum(len(r.prompt_ids) for r in job.requests)

"""The OpenAI-compatible wire format: request schemas (pydantic), response and chunk bodies, streamed text.

Decoding is greedy, so sampling fields are accepted only at values that mean greedy (temperature 0 or omitted,
n = 1); anything else is a 400 that names the field, never a silent change of meaning.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .security import RequestError

__all__ = ["CompletionRequest", "ChatRequest", "TextStream", "parse", "error_body", "usage", "completion_choice",
           "chat_choice", "chat_delta", "sse"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions; unknown fields are ignored as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: Any = None
    seed: int | None = None
    user: str | None = None

    def check_greedy(self) -> None:
        if self.n != 1:
            raise RequestError(400, "n: only n=1 is supported (decoding is greedy)", "n")
        if self.temperature not in (None, 0, 0.0):
            raise RequestError(400, "temperature: decoding is greedy; send temperature 0 or omit it", "temperature")
        if self.logprobs not in (None, False, 0):
            raise RequestError(400, "logprobs: log-probabilities are not returned; omit the field", "logprobs")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise RequestError(400, "stop: stop strings must be non-empty", "stop")
        return tuple(stops)


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str | list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        self.check_greedy()
        for field, bad in (("echo", self.echo), ("suffix", self.suffix is not None),
                           ("best_of", self.best_of not in (None, 1))):
            if bad:
                raise RequestError(400, f"{field}: not supported by this server; omit the field", field)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        self.check_greedy()
        if self.tools:
            raise RequestError(400, "tools: tool calling is not supported; omit the field", "tools")


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate `data` into `model`; a ValidationError becomes a 422 naming every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise RequestError(422, "invalid request: " + "; ".join(problems[:5]),
                           str(first[0]) if first else None) from None


# --- streamed text ------------------------------------------------------------------------------------------
class TextStream:
    """The text of one choice as tokens arrive: decoded from all its tokens, cut at the first stop string.

    Text that could still become a stop string, or ends in an incomplete character, is held back until known.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly safe text."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        safe -= max((k for s in self.stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        delta = text[self.sent:max(safe, self.sent)]
        self.sent += len(delta)
        return delta

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


# --- response bodies ----------------------------------------------------------------------------------------
def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    """One /v1/completions choice (a whole text, or a streamed piece of it)."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def chat_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    """One /v1/chat/completions choice holding the whole assistant message."""
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def chat_delta(index: int, text: str, finish: str | None, first: bool = False) -> dict[str, Any]:
    """One streamed chat choice: the role on the first chunk, then new content, then the finish reason."""
    part: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
    if text:
        part["content"] = text
    return {"index": index, "delta": part, "logprobs": None, "finish_reason": finish}


def sse(body: dict[str, Any] | str) -> str:
    """One server-sent event line pair: `data: {...}` or `data: [DONE]`."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n"

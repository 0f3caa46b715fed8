"""Request and event types shared by the engine and the HTTP server (plain dataclasses, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GenerationRequest", "TokenEvent", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "length", "abort")  # plus "error: <message>"


@dataclass
class GenerationRequest:
    """One greedy generation. adapter: a registered adapter name, or None for the base model.

    stop_token_ids: generation ends after emitting one of these (the stop token is reported, finish "stop").
    """

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class TokenEvent:
    """One step's output for one request. token_id is None on events that carry no token (abort, error).

    finish_reason: "stop" | "length" | "abort" | "error: <message>" when finished, else None.
    """

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None = None

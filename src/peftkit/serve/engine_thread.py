"""One background thread owns the engine; asyncio handlers talk to it through commands and event queues.

Every engine call (add_request, abort, store changes, stats) runs on this one thread, between steps, so the
engine needs no locks. The loop: run queued commands -> one `engine.step()` -> hand each TokenEvent to the
asyncio queue of the request that listens for it (`loop.call_soon_threadsafe`), -> repeat; it sleeps on an
event while the engine has no work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .types import TokenEvent

__all__ = ["EngineThread"]


class EngineThread:
    """Runs `engine.step()` in a loop on a daemon thread and fans events out to per-request asyncio queues."""

    def __init__(self, engine: Any, *, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.steps = 0
        self.step_errors = 0
        self.last_error: str | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the asyncio side -----------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run fn(*args) on the engine thread before its next step; the future holds the result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            future.set_exception(RuntimeError("the engine thread is not running"))
            return future
        self._commands.put((lambda: fn(*args), future))
        self._wake.set()
        return future

    async def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Await fn(*args) run on the engine thread."""
        return await asyncio.wait_for(asyncio.wrap_future(self.call(fn, *args)), timeout)

    def listen(self, request_id: str, q: asyncio.Queue) -> None:
        """Send the events of `request_id` to `q` (call from the event loop that reads `q`)."""
        with self._lock:
            self._listeners[request_id] = (asyncio.get_running_loop(), q)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._listeners.pop(request_id, None)

    # --- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain()
            if not self.engine.has_work():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001  (one bad step fails its requests, not the server)
                self._fail_all(e)
                continue
            self.steps += 1
            self._fan_out(events)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001  (handed to the awaiting handler)
                future.set_exception(e)

    def _fan_out(self, events: list[TokenEvent]) -> None:
        for event in events:
            with self._lock:
                target = self._listeners.get(event.request_id)
                if event.finished:
                    self._listeners.pop(event.request_id, None)
            if target is not None:
                _deliver(target, event)

    def _fail_all(self, error: Exception) -> None:
        """A step raised: every listened request ends with finish_reason "error: ..." and is aborted."""
        self.step_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        with self._lock:
            targets, self._listeners = self._listeners, {}
        for request_id, target in targets.items():
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001, S110  (already gone from the engine)
                pass
            _deliver(target, TokenEvent(request_id, None, True, f"error: {self.last_error}"))
        if self.engine.has_work():
            time.sleep(self.idle_wait_s)  # requests nobody listens for: do not spin on a failing step


def _deliver(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], event: TokenEvent) -> None:
    loop, q = target
    try:
        loop.call_soon_threadsafe(q.put_nowait, event)
    except RuntimeError:  # the request's event loop is closed: nobody is waiting any more
        pass

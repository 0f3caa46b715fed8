"""What the HTTP server accepts as an adapter name and an adapter path (no HTTP types here).

Names: 1-128 printable characters, no path separators, no "..", no leading dot.
Paths: a runtime-loaded adapter directory must resolve (symlinks followed) inside one of the configured adapter
roots, and so must every entry in it; without roots, runtime loading is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["RequestError", "check_adapter_name", "resolve_roots", "resolve_adapter_dir"]

MAX_NAME_CHARS = 128


class RequestError(Exception):
    """A client error: HTTP `status`, a message that says what to fix, and the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def check_adapter_name(name: object, field: str = "model") -> str:
    """`name` if it is a safe adapter name, else RequestError(400) naming `field`."""
    if not isinstance(name, str) or not name:
        raise RequestError(400, f"{field} must be a non-empty string", field)
    bad = [sep for sep in ("/", "\\", os.sep, os.altsep) if sep and sep in name]
    if bad or ".." in name or name.startswith("."):
        raise RequestError(400, f"{field} {name!r} is not a valid adapter name: names may not contain path "
                           "separators or '..' or start with '.'; use a plain name such as 'sql-expert'", field)
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise RequestError(400, f"{field} must be at most {MAX_NAME_CHARS} printable characters", field)
    return name


def resolve_roots(roots: Iterable[str | os.PathLike]) -> tuple[Path, ...]:
    """The adapter roots as absolute real directories (symlinks resolved); a missing root is a startup error."""
    out = []
    for root in roots:
        path = Path(root).resolve()
        if not path.is_dir():
            raise NotADirectoryError(f"adapter root {root!r} is not an existing directory")
        out.append(path)
    return tuple(out)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def resolve_adapter_dir(raw: object, roots: tuple[Path, ...], field: str = "lora_path") -> Path:
    """The real directory `raw` names, checked to lie inside `roots` together with everything in it.

    A relative `raw` is looked up under each root in order. Raises RequestError: 400 (not a string),
    403 (runtime loading disabled, or the path or an entry in it resolves outside the roots), 404 (no such dir).
    """
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise RequestError(400, f"{field} must be a non-empty path string", field)
    if not roots:
        raise RequestError(403, "runtime adapter loading is disabled; start the server with --adapter-root DIR "
                           "to allow loading adapters from DIR", field)
    given = Path(raw)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        real = candidate.resolve()
        if not _inside(real, roots):
            raise RequestError(403, f"{field} {raw!r} resolves outside the adapter roots; the server only loads "
                               f"adapters under {[str(r) for r in roots]}", field)
        if real.is_dir():
            _check_entries(real, roots, raw, field)
            return real
    raise RequestError(404, f"{field} {raw!r} is not a directory under the adapter roots", field)


def _check_entries(directory: Path, roots: tuple[Path, ...], raw: str, field: str) -> None:
    for entry in directory.iterdir():
        if not _inside(entry.resolve(), roots):
            raise RequestError(403, f"{field} {raw!r}: {entry.name} is a link that resolves outside the adapter "
                               "roots; copy the file into the adapter directory instead", field)

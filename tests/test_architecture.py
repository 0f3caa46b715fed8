"""Budgets and import rules from docs/architecture.md, checked on src/peftkit with `ast`.

Function length counts the lines from `def` to the function's last line, less its docstring.
Nesting depth counts if/for/while/with/try/match blocks inside one function (an `elif` chain is one level;
nested functions and classes are measured on their own).
"""

from __future__ import annotations

import ast
import importlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"

# Allowed overruns: "<path under src/peftkit>" exempts a file from the file checks, and
# "<path>::<qualified function name>" exempts one function from the function budgets. One line of reason each.
EXCEPTIONS: dict[str, str] = {
    "methods/increlora.py": "rank growth with an exact resume: chunked factors, their saved layout, training state",
}

MAX_FILE_LINES = 400
MAX_METHOD_FILE_LINES = 200
MAX_FUNCTION_LINES = 60
MAX_NESTING = 4
MAX_MEDIAN_FUNCTION_LINES = 20
PEFT_LIBRARIES = ("peft", "loralib", "adapters", "opendelta")
CORE_MAY_IMPORT = ("peftkit.core", "peftkit.errors", "peftkit.models.presets")  # presets: pure data
HEAVY_MODULES = ("transformers", "peft", "fastapi", "uvicorn")

_BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
_BLOCKS += (ast.TryStar,) if hasattr(ast, "TryStar") else ()
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


# ---------------------------------------------------------------------------------------------- measuring


def functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method in `tree`, nested ones included."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not isinstance(node, ast.ClassDef):
                found.append((prefix + node.name, node))
            found += functions(node, f"{prefix}{node.name}.")
        else:
            found += functions(node, prefix)
    return found


def function_length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    return node.end_lineno - node.lineno + 1 - _docstring_lines(node)


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return first.end_lineno - first.lineno + 1 if is_doc and isinstance(first.value.value, str) else 0


def nesting_depth(node: ast.AST, level: int = 0) -> int:
    """Deepest control-flow nesting in `node`'s own body (nested functions are measured on their own)."""
    return _depth(node, level)


def _depth(node: ast.AST, level: int = 0) -> int:
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _SCOPES):
            continue
        inner = level + 1 if isinstance(child, _BLOCKS) and not _is_elif(node, child) else level
        deepest = max(deepest, _depth(child, inner))
    return deepest


def _is_elif(parent: ast.AST, child: ast.AST) -> bool:
    return (
        isinstance(parent, ast.If)
        and isinstance(child, ast.If)
        and parent.orelse == [child]
        and child.col_offset == parent.col_offset
    )


def imports(tree: ast.AST, package: str) -> list[tuple[int, list[str], int]]:
    """(line, candidate absolute module names, relative level) of each import in `tree`.

    `package` is the importing module's package ("peftkit.core" for core/inject.py and core/__init__.py).
    An import `from a import b` gives candidates ["a", "a.b"]: `b` may be a submodule or a name in `a`.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, package)
            found.append((node.lineno, [base] + [f"{base}.{a.name}" for a in node.names], node.level))
    return found


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def names_used(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string literal and identifier in `tree` (import statements excluded)."""
    fields = {
        ast.Name: "id",
        ast.Attribute: "attr",
        ast.arg: "arg",
        ast.keyword: "arg",
        ast.FunctionDef: "name",
        ast.AsyncFunctionDef: "name",
        ast.ClassDef: "name",
    }
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.append((node.lineno, node.value))
        elif type(node) in fields and getattr(node, fields[type(node)]) is not None:
            used.append((getattr(node, "lineno", 0), getattr(node, fields[type(node)])))
    return used


# ---------------------------------------------------------------------------------------------- the tree


def _sources() -> dict[str, Path]:
    return {p.relative_to(SRC).as_posix(): p for p in sorted(SRC.rglob("*.py"))}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _package_name(rel: str) -> str:
    return ".".join(["peftkit", *rel.split("/")[:-1]])


def _is_method_file(rel: str) -> bool:
    return rel.startswith("methods/")


def _function_items() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """("<rel>::<qualname>", node) for every function under src/peftkit."""
    return [(f"{rel}::{q}", node) for rel, p in _sources().items() for q, node in functions(_tree(p))]


# ---------------------------------------------------------------------------------------------- budgets


def test_file_sizes():
    over = []
    for rel, path in _sources().items():
        limit = MAX_METHOD_FILE_LINES if _is_method_file(rel) else MAX_FILE_LINES
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit and rel not in EXCEPTIONS:
            over.append(f"{rel}: {lines} lines > {limit}")
    assert not over, "\n".join(over)


def test_function_lengths():
    lengths = [(key, function_length(node)) for key, node in _function_items()]
    over = [f"{key}: {n} lines" for key, n in lengths if n > MAX_FUNCTION_LINES and key not in EXCEPTIONS]
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(over)


def test_median_function_length():
    lengths = [function_length(node) for _, node in _function_items()]
    if not lengths:
        pytest.skip("no functions under src/peftkit yet")
    assert statistics.median(lengths) <= MAX_MEDIAN_FUNCTION_LINES


def test_nesting_depth():
    over = [f"{rel}::<module>" for rel, p in _sources().items() if nesting_depth(_tree(p)) > MAX_NESTING]
    over += [
        key for key, node in _function_items() if nesting_depth(node) > MAX_NESTING and key not in EXCEPTIONS
    ]
    assert not over, f"control flow nested deeper than {MAX_NESTING}:\n" + "\n".join(over)


def test_exceptions_name_existing_files_and_functions():
    files, funcs = set(_sources()), {key for key, _ in _function_items()}
    stale = [key for key in EXCEPTIONS if key not in files and key not in funcs]
    assert not stale, f"EXCEPTIONS entries that match nothing: {stale}"
    assert all(reason.strip() and "\n" not in reason for reason in EXCEPTIONS.values())


# ---------------------------------------------------------------------------------------------- imports


def _is_peft_library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in PEFT_LIBRARIES)


def test_src_never_imports_peft_libraries():
    bad = []
    for rel, path in _sources().items():
        for line, candidates, level in imports(_tree(path), _package_name(rel)):
            if level == 0 and _is_peft_library(candidates[0]):
                bad.append(f"{rel}:{line}: imports {candidates[0]}")
    assert not bad, "\n".join(bad)


def _core_may_import(name: str) -> bool:
    return not name.startswith("peftkit") or any(
        name == m or name.startswith(m + ".") for m in CORE_MAY_IMPORT
    )


def test_core_imports_only_core_and_errors():
    bad = []
    for rel, path in _sources().items():
        if not rel.startswith("core/"):
            continue
        for line, candidates, _ in imports(_tree(path), _package_name(rel)):
            if not any(_core_may_import(c) for c in candidates):
                bad.append(f"{rel}:{line}: imports {candidates[-1]}")
    assert not bad, "\n".join(bad)


def test_import_peftkit_stays_light():
    code = f"import sys, peftkit; print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC.parent), os.environ.get("PYTHONPATH")]))
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"`import peftkit` imported {result.stdout.strip()}"


# ---------------------------------------------------------------------------------------------- method names


def _registered_method_names() -> set[str]:
    try:
        importlib.import_module("peftkit")
        importlib.import_module("peftkit.methods")  # registers the built-in methods
        registry = importlib.import_module("peftkit.core.registry")
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("peftkit"):
            raise
        pytest.skip(f"{error.name} does not exist yet")
    try:
        names = registry.method_names()
    except AttributeError:
        pytest.skip("peftkit.core.registry.method_names() does not exist yet")
    if not names and not any(_is_method_file(rel) and not rel.endswith("__init__.py") for rel in _sources()):
        pytest.skip("no method files under src/peftkit/methods/ yet")
    assert names, "the registry is empty after importing peftkit.methods: this check would pass vacuously"
    return {name.lower() for name in names}


def test_only_methods_name_methods():
    methods = _registered_method_names()
    bad = []
    for rel, path in _sources().items():
        if _is_method_file(rel) or rel in EXCEPTIONS:
            continue
        bad += [
            f"{rel}:{line}: {text!r}" for line, text in names_used(_tree(path)) if text.lower() in methods
        ]
    assert not bad, "method names outside src/peftkit/methods/ (go through the registry):\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------- the checkers


def _only_function(source: str) -> ast.FunctionDef:
    return functions(ast.parse(source))[-1][1]


def test_checkers_catch_violations():
    deep = "def f(x):\n" + "".join("    " * (i + 1) + "if x:\n" for i in range(5)) + "    " * 6 + "pass\n"
    assert nesting_depth(_only_function(deep)) == 5
    elifs = (
        "def g(x):\n    if x:\n        pass\n"
        + "    elif x:\n        pass\n" * 6
        + "    else:\n        pass\n"
    )
    assert nesting_depth(_only_function(elifs)) == 1
    nested_else = "def h(x):\n    if x:\n        pass\n    else:\n        if x:\n            pass\n"
    assert nesting_depth(_only_function(nested_else)) == 2
    inner = (
        "def outer():\n    for _ in x:\n        def inner():\n            while y:\n                pass\n"
    )
    assert [(q, nesting_depth(n)) for q, n in functions(ast.parse(inner))] == [
        ("outer", 1),
        ("outer.inner", 1),
    ]
    long = 'class C:\n    def m(self):\n        """Doc.\n\n        More."""\n' + "        x = 1\n" * 61
    assert [(q, function_length(n)) for q, n in functions(ast.parse(long))] == [("C.m", 62)]


def test_import_checkers_resolve_relative_imports():
    tree = ast.parse(
        "import peft.tuners\nfrom .adapters import x\nfrom ..methods import lora\nfrom . import errors\n"
    )
    found = imports(tree, "peftkit.core")
    assert found[0][1] == ["peft.tuners"] and _is_peft_library("peft.tuners")
    assert found[1][1][0] == "peftkit.core.adapters" and found[1][2] == 1
    assert found[2][1] == ["peftkit.methods", "peftkit.methods.lora"] and not any(
        map(_core_may_import, found[2][1])
    )
    assert imports(ast.parse("from .. import errors\n"), "peftkit.core")[0][1] == [
        "peftkit",
        "peftkit.errors",
    ]
    assert not _is_peft_library("peftkit") and not _is_peft_library("adapters_extra")


def test_name_checker_sees_literals_and_identifiers():
    used = {text for _, text in names_used(ast.parse("x = get('LoRA')\nuse_dora = cfg.dora\n"))}
    assert {"LoRA", "dora", "use_dora", "cfg", "x", "get"} <= used

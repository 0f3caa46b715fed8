"""`peftkit` command line: train | eval | merge | export | inspect | methods | serve.

Options after the subcommand's own flags are recipe overrides in dotted form, e.g.
`peftkit train --config recipes/minilm.yaml --train.lr 3e-4 --adapter.r 16`; values are parsed as YAML scalars.
The help text lists every recipe field from the dataclasses, so a new method's fields appear without edits here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def _fields(cls, prefix: str, defaults: dict | None = None) -> list[str]:
    out, defaults = [], defaults or {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        default = defaults.get(f.name, default)
        out.append(f"  --{prefix}{f.name} (default: {default!r})")
    return out


def _recipe_help() -> str:
    from .core.registry import get_method, method_names
    from .train.loop import TrainArgs
    from .train.recipe import DataSpec

    lines = ["recipe fields (YAML keys, or --section.key VALUE overrides):", "  --name, --model, --task"]
    lines += ["data:", *_fields(DataSpec, "data.")]
    lines += ["train:", *_fields(TrainArgs, "train.")]
    lines += ["adapter (--adapter.method NAME, then that method's fields):"]
    for name in method_names():
        lines += [f" method {name}: {get_method(name).summary}"]
    seen = set()
    for name in method_names():
        cls = get_method(name).config_cls
        if cls not in seen:
            seen.add(cls)
            lines += [f" {cls.__name__} fields:", *_fields(cls, "adapter.")]
    return "\n".join(lines)


def _overrides(extra: Sequence[str]) -> dict[str, Any]:
    """['--train.lr', '1e-4', '--adapter.r=8'] -> {'train.lr': 1e-4, 'adapter.r': 8}."""
    import yaml

    from .errors import ConfigError

    out, items = {}, list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ConfigError(flag, "expected an override like --train.lr 1e-4")
        key, _, value = flag[2:].partition("=")
        if not _:
            if not items:
                raise ConfigError(key, "override needs a value")
            value = items.pop(0)
        out[key] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="fine-tune an adapter (no arguments: the embedded default)",
                           formatter_class=fmt, epilog=_LazyHelp())
    train.add_argument("--config", help="recipe YAML (default: the embedded SmolLM2 + Rotten Tomatoes recipe)")
    train.add_argument("--resume", nargs="?", const="latest", help="resume from a checkpoint dir or 'latest'")
    ev = sub.add_parser("eval", help="evaluate an adapter on the recipe's held-out split", formatter_class=fmt)
    ev.add_argument("adapter", help="adapter directory (PEFT format)")
    ev.add_argument("--config", help="recipe YAML giving model and data (default: the embedded recipe)")
    merge = sub.add_parser("merge", help="write a full merged model directory that transformers loads")
    merge.add_argument("adapter")
    merge.add_argument("--out", required=True)
    merge.add_argument("--model", help="base model (default: the adapter config's base or the embedded default)")
    export = sub.add_parser("export", help="write an adapter for another runtime (refuses lossy exports)")
    export.add_argument("adapter")
    export.add_argument("--target", choices=["vllm"], default="vllm")
    export.add_argument("--out", required=True)
    inspect = sub.add_parser("inspect", help="per-layer rank, norm and effective rank of an adapter's deltas")
    inspect.add_argument("adapter")
    inspect.add_argument("--plot", help="spectrum plot path (default: <adapter>/spectrum.png)")
    methods = sub.add_parser("methods", help="list registered methods and their config fields")
    methods.add_argument("--fields", action="store_true", help="also list each method's config fields")
    _serve_parser(sub)
    return parser


def _serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve a base model and many adapters over an OpenAI-compatible HTTP API",
                           description="Requests pick an adapter with the `model` field (the base model's name = "
                           "no adapter). Needs the server extra: pip install 'peftkit[server]'.")
    serve.add_argument("--base", help="base causal LM: a local Hugging Face directory or hub id "
                       "(default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--adapters", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                       help="adapter directories (PEFT format) to serve from the start; a bare PATH is named "
                       "after its directory")
    serve.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                       help="directory that POST /v1/load_lora_adapter may load from (repeatable; none: runtime "
                       "loading is refused)")
    serve.add_argument("--served-model-name", help="the base model's name in requests (default: from --base)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=32, help="most sequences in one step")
    serve.add_argument("--max-adapters-per-step", type=int, default=8, help="most distinct adapters in one step")
    serve.add_argument("--cache-bytes", type=int, default=1 << 30, help="host-memory budget for adapter weights")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096)
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    serve.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


class _LazyHelp(str):
    """An epilog computed only when help is printed (it imports the method registry and the loop)."""

    def __new__(cls):
        return super().__new__(cls, "")

    def __str__(self) -> str:
        return _recipe_help()

    def __bool__(self) -> bool:
        return True

    def expandtabs(self, tabsize: int = 8) -> str:
        return _recipe_help().expandtabs(tabsize)


def _cmd_methods(args) -> int:
    from .core.registry import get_method, method_names

    for name in method_names():
        spec = get_method(name)
        print(f"{name:12s} {spec.summary}")
        if args.fields:
            print("\n".join(_fields(spec.config_cls, "", spec.config_defaults)))
    return 0


def _cmd_inspect(args) -> int:
    from pathlib import Path

    from .tools.inspect import format_table, inspect_adapter, spectrum_plot

    stats = inspect_adapter(args.adapter)
    print(format_table(stats))
    plot = Path(args.plot or Path(args.adapter) / "spectrum.png")
    spectrum_plot(stats, plot)
    print(f"spectrum plot: {plot}")
    return 0


def _cmd_export(args) -> int:
    from .tools.export import export_vllm

    report = export_vllm(args.adapter, args.out)
    print(report)
    return 0


def _cmd_merge(args) -> int:
    from .train.run import merge_command

    print(f"merged model written to {merge_command(args.adapter, args.out, args.model)}")
    return 0


def _cmd_serve(args) -> int:
    from .serve.launch import ServeOptions, run

    run(ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)}))
    return 0


def _cmd_train(args, extra) -> int:
    from .train.recipe import load_recipe
    from .train.run import run_training

    result = run_training(load_recipe(args.config, _overrides(extra)), resume=args.resume)
    return 0 if result is not None else 1


def _cmd_eval(args, extra) -> int:
    from .train.recipe import load_recipe
    from .train.run import evaluate_adapter

    print(evaluate_adapter(load_recipe(args.config, _overrides(extra)), args.adapter))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import PeftkitError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "eval"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"methods": _cmd_methods, "inspect": _cmd_inspect, "export": _cmd_export, "merge": _cmd_merge,
                "serve": _cmd_serve}
    try:
        if args.command in commands:
            return commands[args.command](args)
        return (_cmd_train if args.command == "train" else _cmd_eval)(args, extra)
    except PeftkitError as e:
        print(f"peftkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

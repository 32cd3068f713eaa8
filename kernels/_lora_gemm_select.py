"""Which LoRA GEMM path a lora_linear / lora_linear_group / lora_mlp call takes: lora_linear.py's Triton GEMMs
or lora_cublas.py's cuBLAS GEMMs with the low-rank term folded in (its docstring, "Dispatch").

LORAFUSE_LORA_GEMM=triton|cublas|auto. auto: on a CUDA GPU the path bench/kernels/bench_lora_linear.py
measured faster on that GPU for the call's (K, N) (recorded in $LORAFUSE_CACHE/lora_gemm.json), else the path
the roofline estimate favours (ESTIMATE_FAVOURS, bench/README.md); off CUDA, today's dispatch (Triton
interpreter or PyTorch reference). `forced_path` pins a path for the calls inside it (the engine's
train.lora_gemm), without touching the environment of other threads or calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from pathlib import Path

import torch

from .nf4 import is_nf4

PATHS = ("auto", "triton", "cublas")
ESTIMATE_FAVOURS = "cublas"  # bench/README.md: about 1.09x the bare GEMMs against 1.34x for the Triton path
CHOICE_FILE = "lora_gemm.json"

_FORCED: contextvars.ContextVar = contextvars.ContextVar("lorafuse_lora_gemm", default=None)


# ----------------------------------------------------------------------------- which path


def cache_root() -> Path:
    """$LORAFUSE_CACHE, else $XDG_CACHE_HOME/lorafuse or ~/.cache/lorafuse (as engine/extension.py)."""
    base = os.environ.get("LORAFUSE_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafuse"


def choice_file() -> Path:
    return cache_root() / CHOICE_FILE


def shape_key(tokens: int, k: int, n: int, r: int) -> str:
    return f"T{tokens}-K{k}-N{n}-R{r}"


def read_choices() -> dict:
    """{gpu name: {shape key: {"triton_ms", "cublas_ms", "bare_ms", "choice"}}}; {} when absent or unreadable."""
    try:
        data = json.loads(choice_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measured_choice(gpu: str, shapes, choices: dict | None = None) -> str | None:
    """The faster path on `gpu` over the recorded shapes whose (K, N) is one of `shapes` (any token count or
    rank: the ratio to the bare GEMM is what carries over), by their summed times; None without one."""
    entries = (read_choices() if choices is None else choices).get(gpu, {})
    wanted = {(int(k), int(n)) for k, n in shapes}
    times = {"triton": 0.0, "cublas": 0.0}
    found = False
    for key, rec in entries.items():
        try:
            parts = dict((p[0], int(p[1:])) for p in key.split("-"))
            if (parts["K"], parts["N"]) in wanted:
                times["triton"] += float(rec["triton_ms"])
                times["cublas"] += float(rec["cublas_ms"])
                found = True
        except (KeyError, ValueError, TypeError, IndexError):
            continue
    if not found:
        return None
    return "cublas" if times["cublas"] <= times["triton"] else "triton"


@functools.cache
def _measured_for_call(gpu: str, k: int, n: int) -> str | None:
    return measured_choice(gpu, [(k, n)])


def env_setting() -> str:
    value = os.environ.get("LORAFUSE_LORA_GEMM", "auto")
    if value not in PATHS:
        raise ValueError(f"LORAFUSE_LORA_GEMM must be one of {', '.join(PATHS)}; got {value!r}")
    return value


@contextlib.contextmanager
def forced_path(path: str):
    """Within the block, lora_linear / lora_linear_group / lora_mlp take `path` ("triton" or "cublas"),
    whatever the environment says (engine/lora_gemm.py wraps its ops in this)."""
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def lora_gemm_path(x: torch.Tensor, weight) -> str:
    """"cublas" or "triton" for a call on x (module docstring, Dispatch)."""
    if is_nf4(weight) or (isinstance(weight, torch.Tensor) and weight.requires_grad):
        return "triton"
    path = _FORCED.get() or env_setting()
    if path != "auto":
        return path
    if x.device.type != "cuda":
        return "triton"  # today's CPU dispatch: the interpreter or the reference
    gpu = torch.cuda.get_device_name(x.device)
    return _measured_for_call(gpu, int(weight.shape[1]), int(weight.shape[0])) or ESTIMATE_FAVOURS

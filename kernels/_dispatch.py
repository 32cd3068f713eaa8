"""Which implementation a kernel call runs (DESIGN.md, "Kernel selection").

- CUDA tensors: the Triton kernels.
- CPU tensors with TRITON_INTERPRET=1 set before triton was imported: the same Triton kernels
  through Triton's interpreter (how the CPU test suite runs the real kernel code).
- CPU tensors otherwise, or LORAFUSE_KERNELS=reference: the PyTorch reference.

What happens once Triton is chosen lives in _launch.py.
"""

from __future__ import annotations

import os
import re

import numpy
import torch

from lorafuse._interpreter import interpreter_requested

try:  # triton ships for Linux only; elsewhere every op runs its reference
    import triton

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - Linux CI always has it
    HAVE_TRITON = False

# Triton decides at @triton.jit time whether a kernel is interpreted: remember what it decided.
INTERPRETED = HAVE_TRITON and interpreter_requested()


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of "3.6.0", "3.6rc1", "3.10.0+git1234"."""
    found = re.match(r"(\d+)(?:\.(\d+))?", text)
    return (int(found[1]), int(found[2] or 0)) if found else (0, 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None.

    Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses
    (triton-lang/triton#9171, fixed in 3.7): every kernel with a loop bound would fail with a
    TypeError deep in the interpreter, so we say what to change instead."""
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter does not work with numpy {numpy_version} "
                "(triton-lang/triton#9171); install numpy<2.4 or triton>=3.7")
    return None


INTERPRETER_PROBLEM = interpreter_problem(triton.__version__, numpy.__version__) if INTERPRETED else None


def use_triton(x: torch.Tensor) -> bool:
    """True when this call should run the Triton kernel, from the tensor's device."""
    mode = os.environ.get("LORAFUSE_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"LORAFUSE_KERNELS must be auto, reference or triton; got {mode!r}")
    if mode == "reference":
        return False
    if x.device.type == "cuda":
        if not HAVE_TRITON:
            raise RuntimeError("CUDA tensors need triton (pip install triton), or set LORAFUSE_KERNELS=reference")
        return True
    if x.device.type == "cpu" and interpreter_requested():
        if not INTERPRETED:
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it before importing "
                               "lorafuse or triton so the kernels are built for the interpreter")
        if INTERPRETER_PROBLEM:
            raise RuntimeError(INTERPRETER_PROBLEM)
        return True
    if mode == "triton":
        raise RuntimeError(f"LORAFUSE_KERNELS=triton on {x.device.type} tensors needs CUDA, or TRITON_INTERPRET=1 "
                           "set before triton is imported")
    return False

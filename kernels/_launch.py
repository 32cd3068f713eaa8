"""How a kernel runs once _dispatch has chosen Triton: its output buffers, its launch, its dot precision, and the
count of Triton calls per op.

Every kernel file takes these from here, so a rule changes in one place: tests poison every output buffer by
setting POISON, the interpreter's fixed configs and the autotuners meet in `launch`, and float32 dots follow
one rule (`dot_precision`).
"""

from __future__ import annotations

from collections import Counter

import torch

from ._dispatch import INTERPRETED

# Calls per op that took the Triton path, so a test can prove the kernels ran rather than the reference.
# Not public API: tests import it from here.
launches: Counter = Counter()


def count(op: str) -> None:
    launches[op] += 1


# Tests set this to NaN: then every buffer a kernel is meant to fill starts as NaN, and an element it forgets
# to write shows up in the results.
POISON: float | None = None


def empty_output(shape, dtype, device) -> torch.Tensor:
    """A buffer that a kernel (or a GEMM with out=) fills completely: every such buffer comes from here."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf if POISON is None else buf.fill_(POISON)


def launch(kernel, tuned, grid, /, *args, interpreted: dict, **meta):
    """kernel[grid](*args, **meta), with the block sizes chosen per shape by `tuned`, the kernel's autotuner.

    The interpreter is slow and has nothing to time, so there the kernel itself runs with the small fixed
    config `interpreted` (block sizes). grid is a tuple or, as Triton takes it, a function of the meta
    parameters (the chosen config included)."""
    if INTERPRETED:
        meta = {**meta, **interpreted}
        kernel[grid(meta) if callable(grid) else grid](*args, **meta)
    else:
        tuned[grid](*args, **meta)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of `dtype`; only float32 has a choice.

    float32 dots do what torch's own float32 matmul on a GPU does: TF32 only where the user allowed it
    (torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision("high")), IEEE otherwise.
    DESIGN.md wants a result no further from the float64 reference than stock PyTorch in the same dtype: with
    TF32 always on, a float32 lora_linear would land outside the float32 tolerance (1e-4) where F.linear
    lands inside it. The fused cross-entropy path then agrees with the chunked one, whose logits come from
    torch.mm under the same setting. The interpreter multiplies float32 in numpy, IEEE whatever torch's CUDA
    setting says, so there "ieee" is what runs.
    """
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    if INTERPRETED:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.allow_tf32 or getattr(matmul, "fp32_precision", None) == "tf32"
    return "tf32" if tf32 else "ieee"

"""How a kernel runs once _dispatch has chosen Triton: its output buffers, its launch, and the count of Triton
calls per op.

Every kernel file takes these from here, so a rule changes in one place: tests poison every output buffer by
setting POISON, and the interpreter's fixed configs and the autotuners meet in `launch`.
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

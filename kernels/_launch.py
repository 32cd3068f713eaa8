"""How a kernel runs once _dispatch has chosen Triton: its output buffers and the count of Triton calls per op.

Every kernel file takes these from here, so a rule changes in one place: tests poison every output buffer by
setting POISON.
"""

from __future__ import annotations

from collections import Counter

import torch

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

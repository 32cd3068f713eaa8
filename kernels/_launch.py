"""How a kernel runs once _dispatch has chosen Triton, and the count of Triton calls per op."""

from __future__ import annotations

from collections import Counter

# Calls per op that took the Triton path, so a test can prove the kernels ran rather than the reference.
# Not public API: tests import it from here.
launches: Counter = Counter()


def count(op: str) -> None:
    launches[op] += 1

"""Elementwise Triton device functions that several kernel files share (run by the interpreter too).

tanh(x) = (1 - e) / (1 + e) with e = exp(-2 |x|), the sign restored afterwards: the exponent is never
positive, so nothing overflows for any |x|. triton.language has no tanh that the interpreter also runs.
Absolute error ~1e-7 in float32 (the relative error grows for |x| < 1e-4, where 1 - e cancels; every
caller adds the result to something of order 1 or multiplies it by a cap, so only the absolute error shows).
"""

from __future__ import annotations

from ._dispatch import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def tanh(x):
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

"""Helpers shared by the kernel tests: relative error against a float64 reference, poisoned
outputs, and proof that the Triton path (not the reference) ran."""

from __future__ import annotations

import contextlib

import torch

from lorafuse.kernels import _launch
from lorafuse.kernels._launch import launches

# DESIGN.md: float32 < 1e-4 (tf32 dots < 5e-3); float16 / bfloat16 < 2e-2.
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out, ref, dtype, name="output", tol=None):
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} ({dtype})"


@contextlib.contextmanager
def expect_triton(op: str, at_least: int = 1):
    """Fail unless the op's Triton kernel was launched inside the block."""
    before = launches[op]
    yield
    ran = launches[op] - before
    assert ran >= at_least, f"{op}: expected the Triton kernel to run, it ran {ran} times (reference used?)"


def poison_outputs(monkeypatch):
    """Every buffer a kernel writes (kernels/_launch.py's empty_output) starts as NaN, so an element the
    kernel forgets to write shows up."""
    monkeypatch.setattr(_launch, "POISON", float("nan"))


def poisoned(shape, dtype, device="cpu"):
    """An output buffer full of NaN, so an element the kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)

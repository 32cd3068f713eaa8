"""RMSNorm forward + backward, bf16, widths 4096 and 8192 at 16k rows (issue 8).

Peers in one process: lorafuse's Triton kernels; HF's eager LlamaRMSNorm; torch.compile of that
module; Liger's LigerRMSNorm (skipped when liger_kernel is not installed). The weight is frozen,
as in LoRA training, so the backward computes dx only (each step: forward, then
torch.autograd.grad of x, so no gradient accumulation is timed).

bytes_moved is the minimum HBM traffic of the fused op, the same figure for every peer, so
gb_per_s is comparable across peers and with the `copy` case (x.clone(): read + write of the
same rows), which measures the bandwidth the GPU delivers in this run:
roofline fraction = gb_per_s(case) / gb_per_s(copy).
  rms_norm:          forward reads x, writes y and rstd; backward reads x, dy, rstd, writes dx
                     -> 5 N D e + 8 N (+ the weight twice)
  rms_norm_residual: forward reads x, residual, writes y, h, rstd; backward reads dy, dh, h,
                     rstd, writes one gradient -> 8 N D e + 8 N (+ the weight twice)
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels import rms_norm
from lorafuse.kernels.rms_norm import rms_norm_residual

from benchutil import SMOKE, measure

EPS = 1e-6
ROWS = 8 if SMOKE else 16384
WIDTHS = [64] if SMOKE else [4096, 8192]
SYSTEMS = ["copy", "lorafuse", "hf_eager", "torch_compile", "liger"]


def _norm_module(system: str, width: int, device, dtype):
    """The peer's RMSNorm as a callable x -> y (weight frozen)."""
    if system == "lorafuse":
        weight = torch.ones(width, device=device, dtype=dtype)
        return lambda x: rms_norm(x, weight, EPS)
    if system in ("hf_eager", "torch_compile"):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        module = LlamaRMSNorm(width, eps=EPS).to(device=device, dtype=dtype).requires_grad_(False)
        return torch.compile(module) if system == "torch_compile" else module
    if system == "liger":
        pytest.importorskip("liger_kernel")
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        return LigerRMSNorm(width, eps=EPS).to(device=device, dtype=dtype).requires_grad_(False)
    raise ValueError(system)


def _skip_on_cpu(system: str):
    if SMOKE and system in ("torch_compile", "liger"):
        pytest.skip(f"{system} is only timed on a GPU (smoke mode runs the cheap peers once)")


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm_fwd_bwd(benchmark, system, width, device, dtype):
    _skip_on_cpu(system)
    elem = torch.finfo(dtype).bits // 8
    x = torch.randn(ROWS, width, device=device, dtype=dtype)
    info = dict(system=system, shape=f"{ROWS}x{width}", dtype=str(dtype).removeprefix("torch."),
                op="rms_norm", direction="fwd+bwd")
    if system == "copy":
        measure(benchmark, x.clone, bytes_moved=2 * x.numel() * elem, **info)
        return
    norm = _norm_module(system, width, device, dtype)
    x.requires_grad_()
    dy = torch.randn_like(x)

    def step():
        y = norm(x)
        torch.autograd.grad(y, x, dy)

    if not SMOKE:
        step()  # compile / autotune outside the timing
    measure(benchmark, step, bytes_moved=5 * x.numel() * elem + 8 * ROWS + 2 * width * elem, **info)


@pytest.mark.parametrize("system",
                         ["lorafuse_fused", "lorafuse_unfused", "hf_eager", "torch_compile", "liger"])
@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm_residual_fwd_bwd(benchmark, system, width, device, dtype):
    """h = residual + attn_out; normed = norm(h): fused kernel vs the add followed by each peer's norm."""
    _skip_on_cpu(system)
    elem = torch.finfo(dtype).bits // 8
    x = torch.randn(ROWS, width, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(ROWS, width, device=device, dtype=dtype, requires_grad=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    if system == "lorafuse_fused":
        weight = torch.ones(width, device=device, dtype=dtype)
        add_norm = lambda x, residual: rms_norm_residual(x, residual, weight, EPS)
    else:
        peer = {"lorafuse_unfused": "lorafuse", "torch_compile": "hf_eager"}.get(system, system)
        norm = _norm_module(peer, width, device, dtype)

        def add_norm(x, residual):
            h = residual + x
            return norm(h), h

        if system == "torch_compile":  # compile the add with the norm, so inductor may fuse both
            add_norm = torch.compile(add_norm)

    def step():
        y, h = add_norm(x, residual)
        torch.autograd.grad((y, h), (x, residual), (dy, dh))

    if not SMOKE:
        step()  # compile / autotune outside the timing
    info = dict(system=system, shape=f"{ROWS}x{width}", dtype=str(dtype).removeprefix("torch."),
                op="rms_norm_residual", direction="fwd+bwd")
    measure(benchmark, step, bytes_moved=8 * x.numel() * elem + 8 * ROWS + 2 * width * elem, **info)

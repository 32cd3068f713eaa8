"""SwiGLU activation: h = silu(g) * u = g * sigmoid(g) * u, in float32, returned in g's dtype.

Backward: with sg = sigmoid(g), dg = dh * u * sg * (1 + g (1 - sg)), du = dh * g * sg.

Tiling: elementwise over a 2-D view [rows, cols] of the inputs (all leading dims flattened into
rows); one program per (row, block of BLOCK columns). Rows are addressed with their own stride, so
gate and up may be column slices of one [rows, 2 * cols] buffer (how the fused gate/up projection
returns them) without a copy; the last dim must have stride 1, otherwise the input is copied.
Row offsets are int64 (rows * stride can pass 2^31). Nothing but g and u is saved for backward.

`_swiglu_terms` is the elementwise math shared with the fused MLP backward in lora_linear.py,
which applies it in the epilogue of the GEMM that produces dh, so dh is never stored there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, use_triton
from ._launch import aot_spec, count, empty_output


def swiglu_reference(gate, up):
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# ----------------------------------------------------------------------------- Triton kernels

BLOCK = 1024  # columns per program: elementwise and memory-bound, one block size serves every shape

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_terms(dh, g, u):
        """float32 dh, g, u -> (dg, du, h) of h = silu(g) * u."""
        sg = tl.sigmoid(g)
        silu = g * sg
        dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        du = dh * silu
        return dg, du, silu * u

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, stride_g, stride_u, stride_h, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        g = tl.load(g_ptr + row * stride_g + cols, mask=col_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=col_mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_cols, stride_dh, stride_g, stride_u,
                           stride_dg, stride_du, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=col_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + cols, mask=col_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=col_mask, other=0.0).to(tl.float32)
        dg, du, _ = _swiglu_terms(dh, g, u)
        tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=col_mask)
        tl.store(du_ptr + row * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=col_mask)

    AOT_SPECS = ([aot_spec(_swiglu_fwd_kernel, dtype, {"BLOCK": BLOCK}) for dtype in ("bf16", "fp16", "fp32")]
                 + [aot_spec(_swiglu_bwd_kernel, dtype, {"BLOCK": BLOCK}) for dtype in ("bf16", "fp32")])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, cols] view with unit column stride (a copy only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _grid(rows: int, cols: int):
    return (rows, triton.cdiv(cols, BLOCK))


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None):
    """h = silu(gate) * up through the Triton kernel (no autograd); gate, up 2-D [rows, cols]."""
    g2, u2 = _rows(gate), _rows(up)
    rows, cols = g2.shape
    h = empty_output((rows, cols), gate.dtype, gate.device) if out is None else out
    if rows and cols:
        _swiglu_fwd_kernel[_grid(rows, cols)](g2, u2, h, cols, g2.stride(0), u2.stride(0), h.stride(0),
                                              BLOCK=BLOCK)
    return h


def swiglu_backward_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(dgate, dup) for h = silu(gate) * up through the Triton kernel; all 2-D [rows, cols]."""
    d2, g2, u2 = _rows(dh), _rows(gate), _rows(up)
    rows, cols = g2.shape
    dg = empty_output((rows, cols), gate.dtype, gate.device)
    du = empty_output((rows, cols), up.dtype, up.device)
    if rows and cols:
        _swiglu_bwd_kernel[_grid(rows, cols)](d2, g2, u2, dg, du, cols, d2.stride(0), g2.stride(0),
                                              u2.stride(0), dg.stride(0), du.stride(0), BLOCK=BLOCK)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward_triton(gate, up).view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = swiglu_backward_triton(dh, gate, up)
        return dg.view(gate.shape), du.view(up.shape)


def swiglu(gate, up):
    """silu(gate) * up in float32, returned in gate's dtype (see module docstring)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not use_triton(gate):
        return swiglu_reference(gate, up)
    count("swiglu")
    if up.dtype != gate.dtype:
        up = up.to(gate.dtype)
    return SwiGLUFunction.apply(gate, up)

"""Gated activations h = act(g) * u, in float32, returned in g's dtype: SwiGLU and GeGLU.

  swiglu: act = silu,       silu(g) = g * sigmoid(g)                                  (Llama, Mistral, Qwen)
  geglu:  act = gelu_tanh,  gelu_tanh(g) = g/2 (1 + tanh(c (g + k g^3))), c = sqrt(2/pi), k = 0.044715
          (PyTorch's F.gelu(g, approximate="tanh"), HF's gelu_pytorch_tanh: Gemma 1/2/3)

Backward: dg = dh * u * act'(g), du = dh * act(g), with
  silu'(g)      = sg (1 + g (1 - sg)),  sg = sigmoid(g)
  gelu_tanh'(g) = (1 + t) / 2 + g/2 (1 - t^2) c (1 + 3 k g^2),  t = tanh(c (g + k g^3))
(the same terms, in the same order, as PyTorch's CPU and CUDA gelu backward).

Tiling: elementwise over a 2-D view [rows, cols] of the inputs (all leading dims flattened into
rows); one program per (row, block of BLOCK columns). Rows are addressed with their own stride, so
gate and up may be column slices of one [rows, 2 * cols] buffer (how the fused gate/up projection
returns them) without a copy; the last dim must have stride 1, otherwise the input is copied.
Row offsets are int64 (rows * stride can pass 2^31). Nothing but g and u is saved for backward.
The activation is a constexpr of the kernels (ACTIVATION, one of ACTIVATIONS): one compiled variant each.

`_glu_terms` is the elementwise backward math, shared with swiglu_lora.py. The fused MLP backward in
lora_linear.py (the epilogue of the GEMM that produces dh, so dh is never stored there) uses
`_activation_and_grad` and stores each term as soon as it is computed, which keeps it from spilling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, use_triton
from ._launch import aot_spec, count, empty_output

ACTIVATIONS = ("silu", "gelu_tanh")


def swiglu_reference(gate, up):
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu_reference(gate, up):
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


GLU_REFERENCES = {"silu": swiglu_reference, "gelu_tanh": geglu_reference}


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    return activation


# ----------------------------------------------------------------------------- Triton kernels

BLOCK = 1024  # columns per program: elementwise and memory-bound, one block size serves every shape

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._math import tanh

    @triton.jit
    def _activation(g, ACTIVATION: tl.constexpr):
        """float32 g -> act(g)."""
        if ACTIVATION == "gelu_tanh":
            act = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))  # c = sqrt(2 / pi)
        else:
            act = g * tl.sigmoid(g)
        return act

    @triton.jit
    def _activation_and_grad(g, ACTIVATION: tl.constexpr):
        """float32 g -> (act(g), act'(g)), the terms _glu_terms combines."""
        if ACTIVATION == "gelu_tanh":
            t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
            act = 0.5 * g * (1.0 + t)
            d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:
            sg = tl.sigmoid(g)
            act = g * sg
            d_act = sg * (1.0 + g * (1.0 - sg))
        return act, d_act

    @triton.jit
    def _glu_terms(dh, g, u, ACTIVATION: tl.constexpr):
        """float32 dh, g, u -> (dg, du, h) of h = act(g) * u."""
        if ACTIVATION == "gelu_tanh":
            t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
            act = 0.5 * g * (1.0 + t)
            d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
            dg = dh * u * d_act
        else:
            sg = tl.sigmoid(g)
            act = g * sg
            dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        return dg, dh * act, act * u

    @triton.jit
    def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, stride_g, stride_u, stride_h, BLOCK: tl.constexpr,
                        ACTIVATION: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        g = tl.load(g_ptr + row * stride_g + cols, mask=col_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=col_mask, other=0.0).to(tl.float32)
        h = _activation(g, ACTIVATION) * u
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_cols, stride_dh, stride_g, stride_u,
                        stride_dg, stride_du, BLOCK: tl.constexpr, ACTIVATION: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=col_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + cols, mask=col_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=col_mask, other=0.0).to(tl.float32)
        dg, du, _ = _glu_terms(dh, g, u, ACTIVATION)
        tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=col_mask)
        tl.store(du_ptr + row * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=col_mask)

    AOT_SPECS = ([aot_spec(_glu_fwd_kernel, dtype, {"BLOCK": BLOCK, "ACTIVATION": act})
                  for dtype in ("bf16", "fp16", "fp32") for act in ACTIVATIONS]
                 + [aot_spec(_glu_bwd_kernel, dtype, {"BLOCK": BLOCK, "ACTIVATION": act})
                    for dtype in ("bf16", "fp32") for act in ACTIVATIONS])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, cols] view with unit column stride (a copy only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _grid(rows: int, cols: int):
    return (rows, triton.cdiv(cols, BLOCK))


def glu_forward_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None, *,
                       activation: str = "silu"):
    """h = act(gate) * up through the Triton kernel (no autograd); gate, up 2-D [rows, cols]."""
    g2, u2 = _rows(gate), _rows(up)
    rows, cols = g2.shape
    h = empty_output((rows, cols), gate.dtype, gate.device) if out is None else out
    if rows and cols:
        _glu_fwd_kernel[_grid(rows, cols)](g2, u2, h, cols, g2.stride(0), u2.stride(0), h.stride(0),
                                           BLOCK=BLOCK, ACTIVATION=activation)
    return h


swiglu_forward_triton = glu_forward_triton  # the name lora_linear and the tests used before GeGLU


def glu_backward_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, activation: str = "silu"):
    """(dgate, dup) for h = act(gate) * up through the Triton kernel; all 2-D [rows, cols]."""
    d2, g2, u2 = _rows(dh), _rows(gate), _rows(up)
    rows, cols = g2.shape
    dg = empty_output((rows, cols), gate.dtype, gate.device)
    du = empty_output((rows, cols), up.dtype, up.device)
    if rows and cols:
        _glu_bwd_kernel[_grid(rows, cols)](d2, g2, u2, dg, du, cols, d2.stride(0), g2.stride(0),
                                           u2.stride(0), dg.stride(0), du.stride(0), BLOCK=BLOCK,
                                           ACTIVATION=activation)
    return dg, du


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation: str):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return glu_forward_triton(gate, up, activation=activation).view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = glu_backward_triton(dh, gate, up, activation=ctx.activation)
        return dg.view(gate.shape), du.view(up.shape), None


def _glu(op: str, gate, up, activation: str):
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not use_triton(gate):
        return GLU_REFERENCES[activation](gate, up)
    count(op)
    if up.dtype != gate.dtype:
        up = up.to(gate.dtype)
    return GLUFunction.apply(gate, up, activation)


def swiglu(gate, up):
    """silu(gate) * up in float32, returned in gate's dtype (see module docstring)."""
    return _glu("swiglu", gate, up, "silu")


def geglu(gate, up):
    """gelu_tanh(gate) * up (PyTorch's F.gelu(gate, approximate="tanh") * up, Gemma's MLP) in float32,
    returned in gate's dtype (see module docstring)."""
    return _glu("geglu", gate, up, "gelu_tanh")

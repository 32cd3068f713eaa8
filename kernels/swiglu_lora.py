"""The gated activation that also writes the down projection's LoRA input: [h | U] in one [T, I + R] buffer.

Forward, per row, with act silu (SwiGLU) or gelu_tanh (GeGLU), the down adapter A [R, I], scaling s:
  h = act(g) * u                     (rounded to g's dtype: what the down GEMM reads)
  U = s h A^T                        (from the rounded h)
Backward, given dh [T, I] and dU = V [T, R] (the two column blocks of dY [W_d | B_d], lora_cublas.py):
  dH = dh + s V A                    (the low-rank term joins on the tile, never stored)
  dg = dH u act'(g)     du = dH act(g)      written as the two halves of one [T, 2 I] buffer: the gate/up
                                            group's dY, which its GEMM reads in place
  dA = s V^T h                       float32, from the h saved by the forward

Saved for backward: g, u (views of the gate/up output) and the [h | U] buffer. The Triton path's lora_mlp
keeps no h (its dH GEMM recomputes h in the epilogue); here h stays for dA = s V^T h, T x I more bytes per
layer in memory (0.47 GB at 16k tokens of Llama-3.1-8B, bf16) that the activation planner does not count yet.

Tiling. Forward: a program holds ROWS (>= 16, tl.dot's minimum) rows and walks them in BLOCK_I chunks once:
load g, u, store h, accumulate U += h_chunk A^T_chunk ([ROWS, BLOCK_R] in float32 registers, BLOCK_R =
next_pow2(R) >= 16, masked). Backward: each program one [ROWS, BLOCK_I] tile (no row reduction), the V A
chunk by tl.dot on the tile. One fixed config on GPU (no autotuning yet), a small one in the interpreter.
"""

from __future__ import annotations

import torch

from ._dispatch import HAVE_TRITON, INTERPRETED, use_triton
from ._launch import count, device_arch, dot_precision, empty_output, meta_aot_spec, rank_block
from .swiglu import GLU_REFERENCES


def glu_lowrank_reference(g, u, lora_a, scaling: float, activation: str = "silu"):
    """(h, U) in plain PyTorch (lora_a None: U is None)."""
    h = GLU_REFERENCES[activation](g, u)
    return h, (None if lora_a is None else (h @ lora_a.to(h.dtype).t()) * scaling)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .swiglu import _activation, _glu_terms

    @triton.jit
    def _fwd_kernel(G, stride_g, U, stride_u, A, stride_a, OUT, stride_o, n_rows, I, R, scaling,
                    HAS_LOWRANK: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        offs_i = tl.arange(0, BLOCK_I)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        acc = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            i_ok = (i0 + offs_i) < I
            ok = row_ok[:, None] & i_ok[None, :]
            cols = (i0 + offs_i)[None, :]
            g = tl.load(G + rows64[:, None] * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(U + rows64[:, None] * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
            h = (_activation(g, ACTIVATION) * u).to(OUT.dtype.element_ty)
            tl.store(OUT + rows64[:, None] * stride_o + cols, h, mask=ok)
            if HAS_LOWRANK:
                a_t = tl.load(A + offs_r[None, :] * stride_a + (i0 + offs_i)[:, None],
                              mask=i_ok[:, None] & r_ok[None, :], other=0.0)
                acc = tl.dot(h, a_t, acc, input_precision=DOT_PRECISION)
        if HAS_LOWRANK:
            tl.store(OUT + rows64[:, None] * stride_o + I + offs_r[None, :], (acc * scaling).to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _bwd_kernel(DH, stride_dh, V, stride_v, G, stride_g, U, stride_u, A, stride_a, DGU, stride_dgu, n_rows, I,
                    R, scaling, HAS_LOWRANK: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols1 = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = cols1 < I
        ok = row_ok[:, None] & i_ok[None, :]
        cols = cols1[None, :]
        dh = tl.load(DH + rows64[:, None] * stride_dh + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_LOWRANK:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            v = tl.load(V + rows64[:, None] * stride_v + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                        other=0.0).to(tl.float32)
            sv = (v * scaling).to(A.dtype.element_ty)
            a = tl.load(A + offs_r[:, None] * stride_a + cols, mask=r_ok[:, None] & i_ok[None, :], other=0.0)
            dh = tl.dot(sv, a, dh, input_precision=DOT_PRECISION)
        g = tl.load(G + rows64[:, None] * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + rows64[:, None] * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
        dg, du, _ = _glu_terms(dh, g, u, ACTIVATION)
        tl.store(DGU + rows64[:, None] * stride_dgu + cols, dg.to(DGU.dtype.element_ty), mask=ok)
        tl.store(DGU + rows64[:, None] * stride_dgu + I + cols, du.to(DGU.dtype.element_ty), mask=ok)


def _meta(R: int) -> dict:
    return _meta_for(R, INTERPRETED)


def _meta_for(R: int, interpreted: bool) -> dict:
    block_r = rank_block(R)
    if interpreted:
        return {"ROWS": 16, "BLOCK_I": 32, "BLOCK_R": block_r}
    # sm_80: the SiLU forward at 128-column chunks spills 12 B per thread (python -m lorafuse.kernels.aot --gate)
    wide = block_r <= 64 and device_arch() != 80
    return {"ROWS": 32, "BLOCK_I": 128 if wide else 64, "BLOCK_R": block_r, "num_warps": 8}


if HAVE_TRITON:
    def _aot(kernel, dtype, R, activation):
        types = {"G U A OUT DH V DGU": f"*{dtype}", "scaling": "fp32"}
        consts = {"HAS_LOWRANK": R > 0, "ACTIVATION": activation,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        return meta_aot_spec(kernel, dtype, _meta_for(R, interpreted=False), consts, types)

    AOT_SPECS = [_aot(_fwd_kernel, "bf16", 16, "silu"), _aot(_fwd_kernel, "bf16", 16, "gelu_tanh"),
                 _aot(_fwd_kernel, "fp16", 128, "silu"), _aot(_fwd_kernel, "fp32", 16, "silu"),
                 _aot(_bwd_kernel, "bf16", 16, "silu"), _aot(_bwd_kernel, "bf16", 128, "gelu_tanh"),
                 _aot(_bwd_kernel, "fp32", 16, "silu")]


def _rows(t):
    return t if t.stride(1) == 1 else t.contiguous()


class GluLowRankFunction(torch.autograd.Function):
    """(h, U) of the module docstring as the two column blocks of one buffer (U None without an adapter);
    lora_a in any float dtype (a float32 master gets its float32 gradient)."""

    @staticmethod
    def forward(ctx, g, u, activation: str, scaling: float, lora_a):
        g, u = _rows(g), _rows(u)
        T, inter = g.shape
        R = lora_a.shape[0] if lora_a is not None else 0
        buf = empty_output((T, inter + R), g.dtype, g.device)
        a = lora_a.detach().to(g.dtype).contiguous() if R else buf
        triton_ok = use_triton(g)
        if triton_ok:
            meta = _meta(R)
            if T:
                _fwd_kernel[(triton.cdiv(T, meta["ROWS"]),)](
                    g, g.stride(0), u, u.stride(0), a, a.stride(0) if R else 0, buf, buf.stride(0), T, inter, R,
                    float(scaling), HAS_LOWRANK=R > 0, ACTIVATION=activation, DOT_PRECISION=dot_precision(g.dtype),
                    **meta)
        else:
            h, ud = glu_lowrank_reference(g, u, a if R else None, scaling, activation)
            buf[:, :inter] = h
            if R:
                buf[:, inter:] = ud
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, u, buf, a if R else None)
        ctx.activation, ctx.scaling, ctx.R, ctx.triton = activation, float(scaling), R, triton_ok
        return buf[:, :inter], (buf[:, inter:] if R else None)

    @staticmethod
    def backward(ctx, dh, dud):
        g, u, buf, a = ctx.saved_tensors
        T, inter = g.shape
        R = ctx.R if dud is not None else 0
        if dh is None and not R:
            return None, None, None, None, None
        dh = _rows(dh) if dh is not None else torch.zeros_like(g)
        dgu = empty_output((T, 2 * inter), g.dtype, g.device)
        if ctx.triton:
            v = _rows(dud) if R else dh
            meta = _meta(R)
            if T and inter:
                grid = (triton.cdiv(T, meta["ROWS"]), triton.cdiv(inter, meta["BLOCK_I"]))
                _bwd_kernel[grid](dh, dh.stride(0), v, v.stride(0), g, g.stride(0), u, u.stride(0),
                                  a if R else dh, a.stride(0) if R else 0, dgu, dgu.stride(0), T, inter, R,
                                  ctx.scaling, HAS_LOWRANK=R > 0, ACTIVATION=ctx.activation,
                                  DOT_PRECISION=dot_precision(g.dtype), **meta)
        else:
            if R:
                dh = torch.addmm(dh, dud, a, alpha=ctx.scaling)
            with torch.enable_grad():
                g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
                dg, du = torch.autograd.grad(GLU_REFERENCES[ctx.activation](g_, u_), (g_, u_), dh)
            dgu[:, :inter], dgu[:, inter:] = dg, du
        da = None
        if R and ctx.needs_input_grad[4]:
            from .lora_cublas import f32_mm

            da = f32_mm(dud.t(), buf[:, :inter]) * ctx.scaling
        return dgu[:, :inter], dgu[:, inter:], None, None, da


def glu_lowrank(g, u, lora_a, scaling: float, activation: str = "silu"):
    """(h, U): act(g) * u and U = scaling * h lora_a^T, the two column blocks of one [T, I + R] buffer.

    g, u [T, I] (any row strides, unit column stride); lora_a [R, I] or None (U is None). Through the Triton
    kernels when the tensors' device allows (DESIGN.md), else the same Function on PyTorch ops; either way
    the gradients of g and u come back as the two halves of one [T, 2 I] buffer.
    """
    if g.shape != u.shape or g.dim() != 2:
        raise ValueError(f"glu_lowrank: gate {tuple(g.shape)} and up {tuple(u.shape)} must be the same [T, I]")
    if use_triton(g):
        count("glu_lowrank")
    return GluLowRankFunction.apply(g, u, activation, float(scaling), lora_a)

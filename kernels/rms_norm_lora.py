"""RMSNorm that also writes the LoRA down-projection of its output: [y | U] in one [T, K + R] buffer.

For a row x of width K, with w' = offset + w and the group's adapters A [R, K] (stacked), s [R]:
  rstd = 1 / sqrt(mean(x^2) + eps)
  y    = x * rstd * w'                     (rounded to x's dtype: the value every consumer reads)
  U    = y A^T diag(s)                     (from the rounded y, so the GEMM sees U = s y A^T exactly)
The two outputs are the column blocks of one buffer, so lora_cublas.AugmentedLinearFunction runs
[y | U] [W | B]^T as one GEMM (lora_cublas.py, "Producers").

Backward, given dy [T, K] and dU = V [T, R] (as lora_cublas hands them: the two column blocks of
dY [W | B]):
  g   = (dy + V diag(s) A) * w'            (the low-rank term joins here, on the row already loaded)
  dx  = rstd * (g - xhat * mean(g * xhat)) with xhat = x * rstd
  dA  = diag(s) V^T y                      float32
The norm weight is frozen in LoRA training: a weight that requires grad is refused (use rms_norm then
the public lora_linear_group).

Tiling: a program holds ROWS (>= 16, tl.dot's minimum) rows and walks the row in BLOCK_K chunks twice:
once for the sum of squares, once to normalise, store y and accumulate U += y_chunk A^T_chunk
([ROWS, BLOCK_R] in float32 registers, BLOCK_R = next_pow2(R) >= 16, masked). The second read of
the row hits L2 (ROWS x K x 2 bytes = 256 KB at ROWS 32, K 4096). Backward the same: one pass for
mean(g * xhat) (recomputing g with the V A chunk), one to store dx. No autotuning yet: one fixed
config on GPU (ROWS 32, BLOCK_K 128, 8 warps), the interpreter a small one.
"""

from __future__ import annotations

import torch

from ._dispatch import HAVE_TRITON, INTERPRETED, use_triton
from ._launch import count, dot_precision, empty_output, meta_aot_spec, rank_block


def rms_norm_lowrank_reference(x, weight, eps: float, offset: float, lora_a, scale):
    """(y, U) in plain PyTorch, differentiable by autograd; lora_a [R, K] (None: U is None), scale [R]."""
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())).to(x.dtype)
    if lora_a is None:
        return y, None
    return y, (y @ lora_a.to(y.dtype).t()) * scale.to(y.dtype)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd_kernel(X, stride_x, W, A, stride_a, SCALE, OUT, stride_o, RSTD, n_rows, K, R, eps, offset,
                    HAS_LOWRANK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R

        sq = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = row_ok[:, None] & ((k0 + offs_k) < K)[None, :]
            x = tl.load(X + rows64[:, None] * stride_x + (k0 + offs_k)[None, :], mask=ok, other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        rstd = tl.math.rsqrt(sq / K + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)

        u = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            ok = row_ok[:, None] & k_ok[None, :]
            x = tl.load(X + rows64[:, None] * stride_x + (k0 + offs_k)[None, :], mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32) + offset
            y = (x * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty)
            tl.store(OUT + rows64[:, None] * stride_o + (k0 + offs_k)[None, :], y, mask=ok)
            if HAS_LOWRANK:
                # A^T chunk [BLOCK_K, BLOCK_R]: U is taken from the rounded y that the GEMM will read
                a_t = tl.load(A + offs_r[None, :] * stride_a + (k0 + offs_k)[:, None],
                              mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                u = tl.dot(y, a_t, u, input_precision=DOT_PRECISION)
        if HAS_LOWRANK:
            s = tl.load(SCALE + offs_r, mask=r_ok, other=0.0)
            tl.store(OUT + rows64[:, None] * stride_o + K + offs_r[None, :], (u * s[None, :]).to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _bwd_kernel(DY, stride_dy, V, stride_v, X, stride_x, W, A, stride_a, SCALE, RSTD, DX, n_rows, K, R, offset,
                    HAS_LOWRANK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if HAS_LOWRANK:
            s = tl.load(SCALE + offs_r, mask=r_ok, other=0.0)
            v = tl.load(V + rows64[:, None] * stride_v + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                        other=0.0).to(tl.float32)
            sv = (v * s[None, :]).to(A.dtype.element_ty)
        else:
            sv = rstd  # not read without the low-rank term
        # two passes over the row: mean(g w' xhat) needs the whole row before any dx
        proj = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            gw, xhat, _ = _bwd_chunk(DY, stride_dy, X, stride_x, W, A, stride_a, sv, rows64, row_ok, rstd, k0, K, R,
                                     offset, HAS_LOWRANK, DOT_PRECISION, BLOCK_K, BLOCK_R)
            proj += tl.sum(gw * xhat, axis=1)
        proj = proj / K

        for k0 in range(0, K, BLOCK_K):
            gw, xhat, ok = _bwd_chunk(DY, stride_dy, X, stride_x, W, A, stride_a, sv, rows64, row_ok, rstd, k0, K, R,
                                      offset, HAS_LOWRANK, DOT_PRECISION, BLOCK_K, BLOCK_R)
            dx = (gw - xhat * proj[:, None]) * rstd[:, None]
            tl.store(DX + rows64[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], dx.to(DX.dtype.element_ty),
                     mask=ok)

    @triton.jit
    def _bwd_chunk(DY, stride_dy, X, stride_x, W, A, stride_a, sv, rows64, row_ok, rstd, k0, K, R, offset,
                   HAS_LOWRANK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
        """Columns k0 .. k0 + BLOCK_K of the rows: g w' with g = dY (+ sV A, the low-rank gradient), xhat, and the
        mask of the chunk."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        k_ok = offs_k < K
        ok = row_ok[:, None] & k_ok[None, :]
        g = tl.load(DY + rows64[:, None] * stride_dy + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_LOWRANK:
            a = tl.load(A + offs_r[:, None] * stride_a + offs_k[None, :], mask=(offs_r < R)[:, None] & k_ok[None, :],
                        other=0.0)
            g = tl.dot(sv, a, g, input_precision=DOT_PRECISION)
        w = tl.load(W + offs_k, mask=k_ok, other=0.0).to(tl.float32) + offset
        x = tl.load(X + rows64[:, None] * stride_x + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        return g * w[None, :], x * rstd[:, None], ok


def _meta(R: int) -> dict:
    return _meta_for(R, INTERPRETED)


def _meta_for(R: int, interpreted: bool) -> dict:
    block_r = rank_block(R)
    if interpreted:
        return {"ROWS": 16, "BLOCK_K": 32, "BLOCK_R": block_r}
    return {"ROWS": 32, "BLOCK_K": 128 if block_r <= 64 else 64, "BLOCK_R": block_r, "num_warps": 8}


if HAVE_TRITON:
    def _aot(kernel, dtype, R, **flags):
        types = {"X W A OUT DY V DX": f"*{dtype}", "SCALE RSTD": "*fp32", "eps offset": "fp32"}
        consts = {**flags, "HAS_LOWRANK": R > 0, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        return meta_aot_spec(kernel, dtype, _meta_for(R, interpreted=False), consts, types)

    # the engine's uses: Llama q/k/v (R = 3 x 16) and gate/up (2 x 16), the widest rank block, float32 on GPU
    AOT_SPECS = [_aot(_fwd_kernel, "bf16", 48), _aot(_fwd_kernel, "bf16", 0), _aot(_fwd_kernel, "fp16", 192),
                 _aot(_fwd_kernel, "fp32", 32), _aot(_bwd_kernel, "bf16", 48), _aot(_bwd_kernel, "bf16", 192),
                 _aot(_bwd_kernel, "fp32", 32)]


def _scaled_inputs(lora_a, scale, dtype):
    return lora_a.detach().to(dtype).contiguous(), scale.detach().float().contiguous()


class RMSNormLowRankFunction(torch.autograd.Function):
    """(y, U) of the module docstring as the two column blocks of one buffer; lora_a is the stacked A (any float
    dtype: a float32 master gets its float32 gradient), scale the float32 [R] scaling per rank column."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, lora_a, scale):
        T, K = x.shape
        R = lora_a.shape[0] if lora_a is not None else 0
        buf = empty_output((T, K + R), x.dtype, x.device)
        rstd = empty_output((T,), torch.float32, x.device)
        a = s = buf
        if R:
            a, s = _scaled_inputs(lora_a, scale, x.dtype)
        meta = _meta(R)
        if T:
            _fwd_kernel[(triton.cdiv(T, meta["ROWS"]),)](
                x, x.stride(0), weight, a, a.stride(0) if R else 0, s, buf, buf.stride(0), rstd, T, K, R,
                float(eps), float(offset), HAS_LOWRANK=R > 0, DOT_PRECISION=dot_precision(x.dtype), **meta)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, rstd, buf, a if R else None, s if R else None)
        ctx.offset, ctx.R = float(offset), R
        return buf[:, :K], (buf[:, K:] if R else None)

    @staticmethod
    def backward(ctx, dy, du):
        x, weight, rstd, buf, a, s = ctx.saved_tensors
        T, K = x.shape
        R = ctx.R if du is not None else 0
        dx = da = None
        if ctx.needs_input_grad[0] and (dy is not None or R):
            dy = dy if dy is not None else torch.zeros_like(x)
            dy = dy if dy.stride(1) == 1 else dy.contiguous()
            v = du if R and du.stride(1) == 1 else (du.contiguous() if R else dy)
            dx = empty_output((T, K), x.dtype, x.device)
            meta = _meta(R)
            if T:
                _bwd_kernel[(triton.cdiv(T, meta["ROWS"]),)](
                    dy, dy.stride(0), v, v.stride(0), x, x.stride(0), weight, a if R else x,
                    a.stride(0) if R else 0, s if R else rstd, rstd, dx, T, K, R, ctx.offset,
                    HAS_LOWRANK=R > 0, DOT_PRECISION=dot_precision(x.dtype), **meta)
        if R and ctx.needs_input_grad[4]:
            from .lora_cublas import f32_mm

            da = f32_mm(du.t(), buf[:, :K]) * s[:, None]
        return dx, None, None, None, da, None


def rms_norm_lowrank(x, weight, eps: float, offset: float, lora_a, scale):
    """(y, U): rms_norm(x) and U = y lora_a^T diag(scale), the two column blocks of one [T, K + R] buffer.

    x [T, K]; weight [K] (frozen); lora_a [R, K] or None (then U is None and y is a plain RMSNorm); scale
    float32 [R]. Through the Triton kernels when the tensors' device allows (DESIGN.md), else the reference.
    """
    if weight.requires_grad:
        raise ValueError("rms_norm_lowrank: the norm weight must be frozen (use rms_norm and lora_linear_group)")
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm_lowrank: expected x [T, K] and weight [K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if not use_triton(x):
        return rms_norm_lowrank_reference(x, weight, eps, offset, lora_a, scale)
    count("rms_norm_lowrank")
    x = x if x.stride(1) == 1 else x.contiguous()
    return RMSNormLowRankFunction.apply(x, weight, float(eps), float(offset), lora_a, scale)

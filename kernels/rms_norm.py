"""RMSNorm: y = x / rms(x) * (offset + w), rms(x) = sqrt(mean(x^2) + eps), over the last dim.

offset is 0 for Llama/Qwen/Mistral and 1 for Gemma's (1 + w). Computed in float32, returned in
x's dtype.

Forward, per row x of width D, with w' = offset + w:
  rstd = 1 / sqrt(mean(x^2) + eps)
  xhat = x * rstd
  y    = xhat * w'
Fused residual form (rms_norm_residual): h = x + residual (rounded to x's dtype, as the unfused
add would be), y = rms_norm(h); both y and h are returned, and the norm is taken of the rounded
h that is stored, so forward and backward see the same values.

Backward, with g = dy * w':
  dx = rstd * (g - xhat * mean(g * xhat))           (mean over the row)
  dw = sum over rows of dy * xhat                    (only when weight requires grad)
Residual form: the gradient dh of the returned h adds to dx, and that sum is the gradient of
both x and residual.
Saved for backward: x (or h) and rstd [rows] in float32, nothing else; xhat is recomputed. A LoRA projection of
y keeps the same x instead of y when handed NormedInput (below), and rebuilds y in its backward.

Tiling: a program holds ROWS rows x BLOCK_D columns (BLOCK_D = next power of two >= D, at most
65536) in registers, so each element is read once in the forward and once in the backward. Wide
rows (2048..8192) take ROWS = 1; narrow rows (Qwen3's per-head q/k norm, D = 128) take ROWS of 16
or more so a program still moves several KB. On a GPU ROWS and num_warps are autotuned per width.
dW: the backward grid is about two programs per SM, each looping over row tiles and summing its
dy * xhat into a float32 register vector, stored as one row of a [programs, D] float32 partial
buffer (a program with no tile stores zeros); a torch sum over programs gives dW. No atomics, so
dW is deterministic and autotuning (which reruns kernels) is safe.

Strides: x is viewed as [outer, inner, D] with arbitrary outer and inner strides and a unit last
stride, so Qwen3's q/k norm takes q.view(T, H, D) split out of a fused qkv projection (token
stride > H * D) with no copy; leading dims that cannot be collapsed into one stride are copied
contiguous first. residual may be strided the same way. Outputs and gradients are contiguous.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._dispatch import HAVE_TRITON, INTERPRETED, use_triton
from ._launch import aot_spec, count, empty_output, launch


def rms_norm_reference(x, weight, eps: float, offset: float = 0.0):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def rms_norm_branch_reference(x, weight, eps: float, offset: float = 0.0):
    """(rms_norm(x), x): autograd sums the gradients of the two uses of x."""
    return rms_norm_reference(x, weight, eps, offset), x


def rms_norm_residual_reference(x, residual, weight, eps: float, offset: float = 0.0):
    """h = x + residual in x's dtype, then (rms_norm(h), h)."""
    h = x + residual
    return rms_norm_reference(h, weight, eps, offset), h


MAX_BLOCK_D = 65536

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, stride_x_outer, stride_x_inner,
        R, stride_r_outer, stride_r_inner,
        W, Y, H, RSTD,
        n_rows, n_inner, n_cols, eps, offset,
        HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        outer = rows64 // n_inner
        inner = rows64 % n_inner
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < n_cols
        tile_ok = row_ok[:, None] & col_ok[None, :]

        x_off = (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :]
        x_tile = tl.load(X + x_off, mask=tile_ok, other=0.0).to(tl.float32)
        out_off = rows64[:, None] * n_cols + cols[None, :]
        if HAS_RESIDUAL:
            r_off = (outer * stride_r_outer + inner * stride_r_inner)[:, None] + cols[None, :]
            res_tile = tl.load(R + r_off, mask=tile_ok, other=0.0).to(tl.float32)
            h_tile = (x_tile + res_tile).to(H.dtype.element_ty)
            tl.store(H + out_off, h_tile, mask=tile_ok)
            # Normalise the rounded h that was stored: the backward reloads exactly that.
            x_tile = h_tile.to(tl.float32)

        mean_sq = tl.sum(x_tile * x_tile, axis=1) / n_cols
        rstd_row = tl.math.rsqrt(mean_sq + eps)
        w_row = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        y_tile = x_tile * rstd_row[:, None] * w_row[None, :]
        tl.store(Y + out_off, y_tile.to(Y.dtype.element_ty), mask=tile_ok)
        tl.store(RSTD + rows, rstd_row, mask=row_ok)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, DH, X, stride_x_outer, stride_x_inner,
        W, RSTD, DX, DW_PARTIAL,
        n_rows, n_inner, n_cols, offset,
        HAS_DH: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
        BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < n_cols
        w_row = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        n_tiles = tl.cdiv(n_rows, ROWS)
        # One tile per program without dW (grid = tiles); with dW, ~2 programs per SM stride over
        # the tiles so each keeps one dW partial in registers.
        for tile in range(pid, n_tiles, n_programs):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            rows64 = rows.to(tl.int64)
            outer = rows64 // n_inner
            inner = rows64 % n_inner
            tile_ok = row_ok[:, None] & col_ok[None, :]
            x_off = (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :]
            row_off = rows64[:, None] * n_cols + cols[None, :]

            x_tile = tl.load(X + x_off, mask=tile_ok, other=0.0).to(tl.float32)
            dy_tile = tl.load(DY + row_off, mask=tile_ok, other=0.0).to(tl.float32)
            rstd_row = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x_tile * rstd_row[:, None]
            if COMPUTE_DX:
                g = dy_tile * w_row[None, :]
                proj = tl.sum(g * xhat, axis=1) / n_cols
                dx_tile = (g - xhat * proj[:, None]) * rstd_row[:, None]
                if HAS_DH:
                    dx_tile += tl.load(DH + row_off, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(DX + row_off, dx_tile.to(DX.dtype.element_ty), mask=tile_ok)
            if COMPUTE_DW:
                dw_acc += tl.sum(dy_tile * xhat, axis=0)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_ok)

    def _prune_row_configs(configs, named_args, **kwargs):
        """Keep tiles (ROWS x BLOCK_D) of 2K..8K elements (one row when rows are wider), 8..32 per thread:
        the backward holds x, dy, w and the dW partial per element, and more than that spills."""
        block_d = kwargs["BLOCK_D"]
        kept = []
        for cfg in configs:
            elems = cfg.kwargs["ROWS"] * block_d
            per_thread = elems // (32 * cfg.num_warps)
            tile_ok = 2048 <= elems <= 8192 or (cfg.kwargs["ROWS"] == 1 and block_d > 8192)
            if tile_ok and 8 <= per_thread <= 32:
                kept.append(cfg)
        if not kept:  # 65536-wide rows: the most warps on one row
            kept = [max((c for c in configs if c.kwargs["ROWS"] == 1), key=lambda c: c.num_warps)]
        return kept

    _ROW_CONFIGS = [triton.Config({"ROWS": rows}, num_warps=warps)
                    for rows in (1, 2, 4, 8, 16, 32, 64, 128) for warps in (4, 8, 16, 32)]
    _rms_norm_fwd_tuned = triton.autotune(
        _ROW_CONFIGS, key=["n_cols", "HAS_RESIDUAL"],
        prune_configs_by={"early_config_prune": _prune_row_configs},
    )(_rms_norm_fwd_kernel)
    _rms_norm_bwd_tuned = triton.autotune(
        _ROW_CONFIGS, key=["n_cols", "HAS_DH", "COMPUTE_DX", "COMPUTE_DW"],
        prune_configs_by={"early_config_prune": _prune_row_configs},
    )(_rms_norm_bwd_kernel)

    def _aot(kernel, dtype, block_d, rows, **flags):
        # the tensors here have capital names, not *_ptr ones; rstd and the dW partials are float32
        types = {"X R W Y H DY DH DX": f"*{dtype}", "RSTD DW_PARTIAL": "*fp32", "eps offset": "fp32"}
        return aot_spec(kernel, dtype, {**flags, "BLOCK_D": block_d, "ROWS": rows}, types=types)

    AOT_SPECS = [
        _aot(_rms_norm_fwd_kernel, "bf16", 8192, 1, HAS_RESIDUAL=False),
        _aot(_rms_norm_fwd_kernel, "bf16", 4096, 2, HAS_RESIDUAL=True),
        _aot(_rms_norm_fwd_kernel, "fp16", 128, 32, HAS_RESIDUAL=False),
        _aot(_rms_norm_bwd_kernel, "bf16", 8192, 1, HAS_DH=False, COMPUTE_DX=True, COMPUTE_DW=False),
        _aot(_rms_norm_bwd_kernel, "bf16", 4096, 2, HAS_DH=True, COMPUTE_DX=True, COMPUTE_DW=True),
        _aot(_rms_norm_bwd_kernel, "fp32", 128, 16, HAS_DH=False, COMPUTE_DX=True, COMPUTE_DW=True),
    ]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_d(n_cols: int) -> int:
    block_d = triton.next_power_of_2(n_cols)
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"rms_norm: rows of width {n_cols} exceed the {MAX_BLOCK_D} a program holds")
    return block_d


def _interpreted_rows(block_d: int) -> int:
    return max(1, min(32, 4096 // block_d))


def _as_rows(x):
    """x [..., D] -> (x3 [outer, inner, D] with a unit last stride, n_rows, n_inner)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_cols = x.shape[-1]
    if x.dim() == 1:
        x3 = x.view(1, 1, n_cols)
    elif x.dim() == 2:
        x3 = x.unsqueeze(1)
    else:
        try:  # collapses leading dims that share one stride (e.g. [B, S, H, D] out of a fused qkv)
            x3 = x.view(-1, x.shape[-2], n_cols)
        except RuntimeError:
            x3 = x.contiguous().view(-1, x.shape[-2], n_cols)
    return x3, x3.shape[0] * x3.shape[1], x3.shape[1]


def _forward(x3, res3, weight, eps, offset, n_rows, n_inner):
    n_cols = x3.shape[-1]
    block_d = _block_d(n_cols)
    y = empty_output((n_rows, n_cols), x3.dtype, x3.device)
    rstd = empty_output((n_rows,), torch.float32, x3.device)
    h = empty_output((n_rows, n_cols), x3.dtype, x3.device) if res3 is not None else y
    r3 = res3 if res3 is not None else x3
    if n_rows == 0:
        return y, h, rstd
    args = (x3, x3.stride(0), x3.stride(1), r3, r3.stride(0), r3.stride(1), weight, y, h, rstd,
            n_rows, n_inner, n_cols, eps, offset)
    launch(_rms_norm_fwd_kernel, _rms_norm_fwd_tuned, lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),), *args,
           interpreted={"ROWS": _interpreted_rows(block_d)}, HAS_RESIDUAL=res3 is not None, BLOCK_D=block_d)
    return y, h, rstd


def _backward(dy, dh, x3, weight, rstd, offset, n_rows, n_inner, need_dx, need_dw):
    n_cols = x3.shape[-1]
    block_d = _block_d(n_cols)
    dy = dy.reshape(n_rows, n_cols).contiguous()
    dh = dh.reshape(n_rows, n_cols).contiguous() if dh is not None else dy
    dx = empty_output((n_rows, n_cols), x3.dtype, x3.device) if need_dx else dy
    if n_rows == 0:
        dw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_dw else None
        return dx, dw
    if need_dw:
        programs = 4 if INTERPRETED else 2 * _sm_count(x3.device.index if x3.device.index is not None else 0)
        programs = min(programs, n_rows)
        dw_partial = empty_output((programs, n_cols), torch.float32, x3.device)
    else:
        programs, dw_partial = None, rstd
    args = (dy, dh, x3, x3.stride(0), x3.stride(1), weight, rstd, dx, dw_partial,
            n_rows, n_inner, n_cols, offset)
    grid = (lambda meta: (programs,)) if need_dw else (lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),))
    launch(_rms_norm_bwd_kernel, _rms_norm_bwd_tuned, grid, *args, interpreted={"ROWS": _interpreted_rows(block_d)},
           HAS_DH=dh is not dy, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, BLOCK_D=block_d)
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


def _norm_saving(ctx, x, weight, eps, offset):
    x3, n_rows, n_inner = _as_rows(x)
    y, _, rstd = _forward(x3, None, weight, eps, offset, n_rows, n_inner)
    ctx.save_for_backward(x3, weight, rstd)
    ctx.offset, ctx.n_rows, ctx.n_inner, ctx.shape = offset, n_rows, n_inner, x.shape
    return y.view(x.shape)


def _norm_backward(ctx, dy, dx_extra):
    """dx (plus dx_extra, the gradient of another use of x, added in the kernel) and dw."""
    x3, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = _backward(dy, dx_extra, x3, weight, rstd, ctx.offset, ctx.n_rows, ctx.n_inner, need_dx, need_dw)
    return (dx.view(ctx.shape) if need_dx else None), dw, None, None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        return _norm_saving(ctx, x, weight, eps, offset)

    @staticmethod
    def backward(ctx, dy):
        return _norm_backward(ctx, dy, None)


class _RMSNormBranch(torch.autograd.Function):
    """(y, x): x returned as itself (autograd makes it an alias), so the gradient of the residual path that reads
    it comes back into this backward and is added in the kernel (HAS_DH), not by a separate add."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        return _norm_saving(ctx, x, weight, eps, offset), x

    @staticmethod
    def backward(ctx, dy, dx_branch):
        return _norm_backward(ctx, dy, dx_branch)


class _RMSNormResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset):
        x3, n_rows, n_inner = _as_rows(x)
        res3, _, _ = _as_rows(residual)
        y, h, rstd = _forward(x3, res3, weight, eps, offset, n_rows, n_inner)
        h = h.view(x.shape)
        ctx.save_for_backward(h, weight, rstd)
        ctx.offset, ctx.n_rows = offset, n_rows
        return y.view(x.shape), h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_dw = ctx.needs_input_grad[2]
        h3 = h.view(ctx.n_rows, 1, h.shape[-1])
        dx, dw = _backward(dy, dh, h3, weight, rstd, ctx.offset, ctx.n_rows, 1, need_dx, need_dw)
        dx = dx.view(h.shape) if need_dx else None
        need_x, need_residual = ctx.needs_input_grad[:2]
        return (dx if need_x else None), (dx if need_residual else None), dw, None, None


class NormedInput(NamedTuple):
    """What an rms_norm output y was computed from: y = rms_norm(h, weight, eps, offset).

    A LoRA projection of y needs y again in backward (dA = V^T y). Handed this, it keeps h, which the norm's own
    backward keeps anyway (one storage, counted once), and rebuilds y there with one forward launch of the same
    kernel on the same h (the same values), without a second [tokens, D] tensor kept per norm. For the output of
    rms_norm_residual, h is the returned sum h: the fused kernel normalises the rounded h it stores, so the
    rebuild computes the same math, equal up to the order of the float32 sum of squares when the two kernels'
    tuned configs differ."""

    h: torch.Tensor
    weight: torch.Tensor
    eps: float
    offset: float = 0.0
    # a dict for one backward to hand y, rebuilt, to the next (the engine's k/v recompute to the q/k/v
    # projection's dA), so it is built once: `values(keep=True)` leaves it there, the projection takes it
    rebuilt: dict | None = None

    def values(self, h: torch.Tensor | None = None, keep: bool = False) -> torch.Tensor:
        """y again (from h, or from self.h): rms_norm_values, or the y an earlier values(keep=True) left."""
        if self.rebuilt and "y" in self.rebuilt:
            return self.rebuilt["y"] if keep else self.rebuilt.pop("y")
        y = rms_norm_values(self.h if h is None else h, self.weight, self.eps, self.offset)
        if keep and self.rebuilt is not None:
            self.rebuilt["y"] = y
        return y

    def check(self, y: torch.Tensor, op: str) -> None:
        if self.h.shape != y.shape or self.h.dtype != y.dtype or self.h.device != y.device:
            raise ValueError(f"{op}: normed_from.h {tuple(self.h.shape)} {self.h.dtype} does not match x "
                             f"{tuple(y.shape)} {y.dtype} on {y.device}")


def rms_norm_values(h, weight, eps: float, offset: float = 0.0) -> torch.Tensor:
    """rms_norm(h, weight, eps, offset) without autograd: the rebuild of NormedInput (one forward launch)."""
    count("rms_norm_values")
    h3, n_rows, n_inner = _as_rows(h)
    y, _, _ = _forward(h3, None, weight, float(eps), float(offset), n_rows, n_inner)
    return y.view(h.shape)


def _check(x, weight, op):
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: expected x [..., D] and weight [D]; "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{op}: x is on {x.device}, weight on {weight.device}")


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    """x / rms(x) * (offset + weight) over the last dim; float32 math, x's dtype out.

    x [..., D], possibly a strided view (see the module docstring); weight [D]. Differentiable in
    x, and in weight when it requires grad (dW summed in float32).
    """
    _check(x, weight, "rms_norm")
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps, offset)
    count("rms_norm")
    return _RMSNorm.apply(x, weight, float(eps), float(offset))


def rms_norm_branch(x, weight, eps: float, offset: float = 0.0):
    """(rms_norm(x, weight, eps, offset), x) for a residual stream x that branches into a normalised block and the
    residual path: use the returned x for the residual path, and the gradients of both uses meet in the norm's
    backward kernel (one launch) instead of an add after it. x's backward needs of the norm are rms_norm's."""
    _check(x, weight, "rms_norm_branch")
    if not use_triton(x):
        return rms_norm_branch_reference(x, weight, eps, offset)
    count("rms_norm")
    return _RMSNormBranch.apply(x, weight, float(eps), float(offset))


def rms_norm_residual(x, residual, weight, eps: float, offset: float = 0.0):
    """(rms_norm(h), h) with h = x + residual in one pass: x and residual read once, each output written once.

    x and residual have the same shape and dtype ([..., D], either may be a strided view); h is
    rounded to that dtype before it is normalised, as `h = x + residual; rms_norm(h)` would be.
    The backward takes the gradients of both outputs and returns one gradient for x and residual.
    """
    _check(x, weight, "rms_norm_residual")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"rms_norm_residual: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if not use_triton(x):
        return rms_norm_residual_reference(x, residual, weight, eps, offset)
    count("rms_norm_residual")
    return _RMSNormResidual.apply(x, residual, weight, float(eps), float(offset))

"""LoRA projections whose big matmuls are cuBLAS calls, the low-rank term folded into them (augmented K).

Notation of lora_linear.py: x [T, K], frozen W [N, K], A [R, K] (the group's adapters stacked), B [N, R]
(block-diagonal over the group's outputs), s the per-rank-column scaling, U = x A^T diag(s) [T, R].
With the frozen weight kept beside B as one buffer WB = [W | B] [N, K + R] and the input beside U as one
buffer XU = [x | U] [T, K + R]:

  forward    y = XU WB^T + bias = x W^T + U B^T + bias                one GEMM, K + R deep
  backward   [dX_base | V] = dY WB = [dY W | dY B]                    one GEMM, K + R wide
             dX = dX_base + V diag(s) A                               joined by whoever made x (below)
             dA = diag(s) V^T x        dB_i = dY_i^T U_i              float32 results (float32 accumulation)

U carries the scale, so dB needs none; V is exactly the gradient of U, so the producer of [x | U] gets
[dX_base | V] as the gradients of its two outputs, in one buffer, and finishes dX itself.

Producers of [x | U] (who computes U = x A^T diag(s) and later adds V diag(s) A):
- q/k/v and gate/up: the RMSNorm in front of them (rms_norm_lora.py) writes [x_hat | U] in one pass over
  the row it normalises, and its backward adds V diag(s) A to the row it reads anyway. No extra pass.
- down_proj: the SwiGLU/GeGLU kernel (swiglu_lora.py), which holds each row of h as it writes it: it writes
  [h | U] and accumulates U = h A^T diag(s) over the row chunks it stores, so h is never read again for U;
  its backward adds V diag(s) A on each tile before the GLU backward and writes dG and dU into one [T, 2 I]
  buffer, the gate/up group's dY (read in place). Chosen over one skinny GEMM for U: that GEMM reads h
  again (T I bytes, 0.47 GB per layer at the headline shape) and the V A term would then be one more
  read and write of dH (another 0.94 GB), where the producer's tile already holds everything; the price is
  that the GLU now needs row tiles of >= 16 rows (tl.dot) instead of being purely elementwise.
- o_proj (and every public call, whose input comes from outside): `CublasLoraFunction`, one skinny GEMM
  for U, then y = x W^T + bias and y += U B^T (a rank-R addmm on y). The producer of o_proj's input is the
  attention kernel; writing [o | U] there would put a dot into its epilogue (another engineer's kernel,
  and U needs whole rows of o, which one attention program does not hold). Backward is one dY [W | B] GEMM
  when a WB buffer is registered for the weight, two GEMMs into one buffer otherwise.

WB buffers (`register_augmented`): engine/lora_gemm.py writes each layer's [W | B] once (the projections'
weights become views of its first K columns) and refreshes the B columns from the float32 masters after
every optimizer step. A public call on a weight without a registered WB computes the same result with the
B of its arguments (never a per-call copy of W).

Dispatch: LORAFUSE_LORA_GEMM=triton|cublas|auto picks lora_linear.py's Triton GEMMs or this path for
lora_linear, lora_linear_group and lora_mlp; auto takes, on a CUDA GPU, the path the kernel benchmark
measured faster there (bench/kernels/bench_lora_linear.py records it in $LORAFUSE_CACHE/lora_gemm.json,
keyed by GPU name and shapes), else the path the roofline estimate favours (this one); on CPU auto keeps
today's dispatch (Triton interpreter or PyTorch reference). engine/lora_gemm.py pins the choice per
training run (train.lora_gemm), scoped to its calls (`forced_path`).
Not here: NF4 weights (the Triton path dequantizes them inside its GEMMs; a call with an NF4Weight runs
the Triton path whatever the setting) and weights or biases that train (the Triton path computes dW).
"""

from __future__ import annotations

import os

import torch

from ._launch import count, empty_output
from ._lora_gemm_select import forced_path, lora_gemm_path  # noqa: F401  (re-exported)
from .lora_linear import (
    _check_adapter,
    _compute_dtype,
    _Plan,
    _scale_vector,
    lora_linear_group_reference,
)
from .swiglu import check_activation
from .swiglu_lora import glu_lowrank

# ----------------------------------------------------------------------------- helpers


def f32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (LoRA gradients are not rounded to 16 bits)."""
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: 16-bit inputs, float32 output
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def adjacent(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor | None:
    """[left | right] as one [T, a + b] view when they are the two column blocks of one row-major buffer."""
    if left.dim() != 2 or right.dim() != 2 or left.dtype != right.dtype or left.shape[0] != right.shape[0]:
        return None
    width = left.shape[1] + right.shape[1]
    if left.stride(1) != 1 or right.stride(1) != 1 or left.stride(0) != width or right.stride(0) != width:
        return None
    if right.data_ptr() != left.data_ptr() + left.shape[1] * left.element_size():
        return None
    return left.as_strided((left.shape[0], width), (width, 1))


def _joined(dys, splits, rows, like) -> torch.Tensor:
    """The dY_i as one [T, N] matrix: a view when they are adjacent column blocks, else one copy."""
    present = [d for d in dys if d is not None]
    if len(present) == len(dys):
        whole = dys[0]
        for d in dys[1:]:
            whole = adjacent(whole, d) if whole is not None else None
        if whole is not None:
            return whole
    return torch.cat([d if d is not None else like.new_zeros(rows, n) for d, n in zip(dys, splits, strict=True)], 1)


def block_b(plan: _Plan, lora_bs, dtype) -> torch.Tensor:
    """Block-diagonal B [sum n_i, R] in `dtype` from the group's B_i (None or rank 0: no block)."""
    n_total, r_total = sum(plan.splits), sum(plan.ranks)
    out = lora_bs[0].new_zeros((n_total, r_total), dtype=dtype) if r_total else None
    for b, n_off, n, r_off, r in zip(lora_bs, plan.offsets, plan.splits, plan.r_offsets, plan.ranks, strict=True):
        if r:
            out[n_off:n_off + n, r_off:r_off + r] = b.detach()
    return out


def scaled_a(plan: _Plan, lora_as, dtype, device) -> torch.Tensor | None:
    """diag(s) A [R, K] in `dtype` (the adapters' A_i stacked, each times its scaling)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # scale before rounding to dtype
    parts = [a.detach().to(wide) * s for a, r, s in zip(lora_as, plan.ranks, plan.scalings, strict=True) if r]
    if not parts:
        return None
    return torch.cat(parts, 0).to(device=device, dtype=dtype)


def register_augmented(weight: torch.Tensor, wb: torch.Tensor) -> None:
    """Declare weight == wb[:, :K] with wb[:, K:] holding the current block-diagonal B (engine/lora_gemm.py
    keeps that true); this path then reads wb instead of building B per call."""
    assert weight.data_ptr() == wb.data_ptr() and weight.stride() == wb.stride() and weight.shape[0] == wb.shape[0]
    weight._lorafuse_wb = wb


def augmented_of(weight, n_rank: int) -> torch.Tensor | None:
    wb = getattr(weight, "_lorafuse_wb", None)
    if wb is None or wb.shape[1] != weight.shape[1] + n_rank or wb.data_ptr() != weight.data_ptr():
        return None
    return wb


# ----------------------------------------------------------------------------- autograd Functions


def _adapter_grads(plan, dys, u, v, x2d, need):
    """dA_i = s_i V_i^T x and dB_i = dY_i^T U_i in float32 (None where not needed)."""
    grads = []
    da_all = f32_mm(v.t(), x2d) if v is not None and any(need) else None
    for i, (n, r, r_off, s) in enumerate(zip(plan.splits, plan.ranks, plan.r_offsets, plan.scalings, strict=True)):
        if not (r and need[i]):
            grads += [None, None]
            continue
        da = da_all[r_off:r_off + r] * s
        db = f32_mm(dys[i].t(), u[:, r_off:r_off + r]) if dys[i] is not None else \
            torch.zeros(n, r, dtype=torch.float32, device=x2d.device)
        grads += [da, db]
    return grads


class CublasLoraFunction(torch.autograd.Function):
    """y_i = x W_i^T + bias_i + s_i (x A_i^T) B_i^T for x from outside (o_proj, public calls): U by one skinny
    GEMM, y = x W^T + bias, y += U B^T; backward one dY [W | B] GEMM (registered WB) or two into one buffer."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: _Plan, *adapters):
        lora_as, lora_bs = list(adapters[0::2]), list(adapters[1::2])
        x2d = _as_rows(x)
        T, K = x2d.shape
        dtype = x2d.dtype
        n_total = sum(plan.splits)
        sa = scaled_a(plan, lora_as, dtype, x.device)
        wb = augmented_of(weight, sum(plan.ranks)) if sa is not None else None
        b_all = (wb[:, K:] if wb is not None else block_b(plan, lora_bs, dtype)) if sa is not None else None
        out = torch.addmm(bias, x2d, weight.t()) if bias is not None else torch.mm(x2d, weight.t())
        u = None
        if sa is not None:
            u = torch.mm(x2d, sa.t())
            out.addmm_(u, b_all.t())
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2d, u)
        ctx.plan, ctx.weight, ctx.wb, ctx.b_all, ctx.sa, ctx.x_shape = plan, weight, wb, b_all, sa, x.shape
        out = out.view(*x.shape[:-1], n_total)
        return out if len(plan.splits) == 1 else tuple(out.split(list(plan.splits), -1))

    @staticmethod
    def backward(ctx, *grads):
        x2d, u = ctx.saved_tensors
        plan, weight, wb, b_all, sa = ctx.plan, ctx.weight, ctx.wb, ctx.b_all, ctx.sa
        T, K = x2d.shape
        needs = ctx.needs_input_grad
        dys = [g.reshape(-1, g.shape[-1]) if g is not None else None for g in grads]
        need_ab = [needs[4 + 2 * i] or needs[5 + 2 * i] for i in range(len(plan.splits))]
        if all(d is None for d in dys):
            return (None,) * (4 + len(need_ab) * 2)
        dy = _joined(dys, plan.splits, T, x2d)
        R = u.shape[1] if u is not None else 0
        dx = v = None
        if wb is not None and (needs[0] or any(need_ab)):
            g = torch.mm(dy, wb)  # [dX_base | V] in one GEMM
            dx, v = g[:, :K], g[:, K:]
        else:
            if needs[0]:
                dx = torch.mm(dy, weight)
            if R and (needs[0] or any(need_ab)):
                v = torch.mm(dy, b_all)
        if needs[0] and v is not None:
            dx.addmm_(v, sa)
        dbias = dy.sum(0) if needs[2] else None
        adapter_grads = _adapter_grads(plan, dys, u, v, x2d, need_ab)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.reshape(ctx.x_shape) if dx.is_contiguous() else dx.contiguous().view(ctx.x_shape)
        return (dx if needs[0] else None, None, dbias, None, *adapter_grads)


class AugmentedLinearFunction(torch.autograd.Function):
    """y_i = [x | U] [W | B]^T + bias restricted to output block i, with x and U given by a producer
    (rms_norm_lora.py, swiglu_lora.py). Gradients: [dx | dU] = dY [W | B] in one buffer (the producer's
    to finish), dB_i = dY_i^T U_i in float32. The B_i arguments are only where their gradients go: B is read
    from the registered WB (else from them, per call)."""

    @staticmethod
    def forward(ctx, x, u, weight, bias, plan: _Plan, *lora_bs):
        T, K = x.shape
        wb = augmented_of(weight, u.shape[1]) if u is not None else None
        xu = adjacent(x, u) if wb is not None else None
        if xu is not None:  # the one GEMM, K + R deep
            out = torch.addmm(bias, xu, wb.t()) if bias is not None else torch.mm(xu, wb.t())
            b_all = wb[:, K:]
        else:
            out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
            b_all = None
            if u is not None:
                b_all = wb[:, K:] if wb is not None else block_b(plan, lora_bs, x.dtype)
                out.addmm_(u, b_all.t())
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u)
        ctx.plan, ctx.weight, ctx.wb, ctx.b_all, ctx.K = plan, weight, wb, b_all, K
        return out if len(plan.splits) == 1 else tuple(out.split(list(plan.splits), -1))

    @staticmethod
    def backward(ctx, *grads):
        (u,) = ctx.saved_tensors
        plan, weight, wb, b_all, K = ctx.plan, ctx.weight, ctx.wb, ctx.b_all, ctx.K
        needs = ctx.needs_input_grad
        dys = [g.reshape(-1, g.shape[-1]) if g is not None else None for g in grads]
        n_b = len(plan.splits)
        if all(d is None for d in dys):
            return (None,) * (5 + n_b)
        T = next(d for d in dys if d is not None).shape[0]
        dy = _joined(dys, plan.splits, T, weight)
        R = u.shape[1] if u is not None else 0
        if wb is not None:
            g = torch.mm(dy, wb)  # [dX_base | V] in one GEMM: the producer reads both in place
        else:
            g = empty_output((T, K + R), dy.dtype, dy.device)
            torch.mm(dy, weight, out=g[:, :K]) if g[:, :K].is_contiguous() else g[:, :K].copy_(dy @ weight)
            if R:
                g[:, K:].copy_(dy @ b_all)
        dx, du = g[:, :K], (g[:, K:] if R else None)
        dbs = []
        for i, (n, r, r_off) in enumerate(zip(plan.splits, plan.ranks, plan.r_offsets, strict=True)):
            if not (r and needs[5 + i]):
                dbs.append(None)
            elif dys[i] is None:
                dbs.append(torch.zeros(n, r, dtype=torch.float32, device=dy.device))
            else:
                dbs.append(f32_mm(dys[i].t(), u[:, r_off:r_off + r]))
        dbias = dy.sum(0) if needs[3] else None
        return (dx if needs[0] else None, du if needs[1] else None, None, dbias, None, *dbs)


# ----------------------------------------------------------------------------- public functions


def _prepare_group(x, weight, lora_as, lora_bs, scalings, out_splits, bias):
    # torch's GEMMs take float64 too (the numerics tests check this path against itself in float64)
    dtype = torch.float64 if x.dtype == torch.float64 and not torch.is_autocast_enabled(x.device.type) \
        else _compute_dtype(x)
    x = x if x.dtype == dtype else x.to(dtype)
    weight = weight if weight.dtype == dtype else weight.to(dtype)
    bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    ranks = tuple(_check_adapter(f"lora_linear_group[{i}]", a, b, n, weight.shape[1])
                  for i, (a, b, n) in enumerate(zip(lora_as, lora_bs, out_splits, strict=True)))
    plan = _Plan.make(tuple(out_splits), ranks, tuple(float(s) for s in scalings))
    return x, weight, bias, plan


def lora_linear_group(x, weight, lora_as, lora_bs, scalings, out_splits, bias=None) -> tuple:
    """lora_linear.lora_linear_group on this path (same signature and results; A and B in any float dtype:
    float32 masters get float32 gradients)."""
    out_splits = tuple(int(n) for n in out_splits)
    if x.device.type == "cpu" and os.environ.get("LORAFUSE_KERNELS") == "reference":
        return lora_linear_group_reference(x, weight, lora_as, lora_bs, scalings, out_splits, bias)
    count("lora_cublas")
    x, weight, bias, plan = _prepare_group(x, weight, lora_as, lora_bs, scalings, out_splits, bias)
    adapters = [t for pair in zip(lora_as, lora_bs, strict=True) for t in pair]
    outs = CublasLoraFunction.apply(x, weight, bias, plan, *adapters)
    return outs if isinstance(outs, tuple) else (outs,)


def lora_linear(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """lora_linear.lora_linear on this path."""
    return lora_linear_group(x, weight, [lora_a], [lora_b], [scaling], [weight.shape[0]], bias)[0]


def lora_mlp(x, gate_up_weight, gate_a, gate_b, gate_scaling, up_a, up_b, up_scaling,
             down_weight, down_a, down_b, down_scaling, activation: str = "silu"):
    """lora_linear.lora_mlp on this path: gate/up by CublasLoraFunction, then the GLU producer of [h | U_down]
    and the down projection's augmented GEMM."""
    check_activation(activation)
    hidden, inter = down_weight.shape
    if gate_up_weight.shape != (2 * inter, hidden):
        raise ValueError(f"lora_mlp: gate_up_weight {tuple(gate_up_weight.shape)} is not [2 * {inter}, {hidden}]")
    lead = x.shape[:-1]
    g, u = lora_linear_group(x.reshape(-1, hidden), gate_up_weight, [gate_a, up_a], [gate_b, up_b],
                             [gate_scaling, up_scaling], [inter, inter])
    down_weight = down_weight if down_weight.dtype == g.dtype else down_weight.to(g.dtype)
    return glu_down(g, u, down_weight, down_a, down_b, down_scaling, activation).view(*lead, hidden)


def glu_down(g, u, down_weight, down_a, down_b, down_scaling, activation):
    """down(act(g) * u) with the down LoRA folded into its GEMM (g, u [T, I] in the compute dtype)."""
    hidden, inter = down_weight.shape
    r = _check_adapter("lora_mlp down", down_a, down_b, hidden, inter)
    h, ud = glu_lowrank(g, u, down_a, float(down_scaling), activation)
    plan = _Plan.make((hidden,), (r,), (float(down_scaling),))
    return AugmentedLinearFunction.apply(h, ud, down_weight, None, plan, down_b)


__all__ = ["lora_linear", "lora_linear_group", "lora_mlp", "lora_gemm_path", "forced_path", "register_augmented",
           "AugmentedLinearFunction", "CublasLoraFunction", "f32_mm", "_scale_vector"]

"""Cross-entropy of a linear head without materialising the [N, V] logits.

Math. For row i with labels[i] = y != ignore_index (a "target"):
  z = W h_i (+ b)                                   raw logits, [V]
  c = s * tanh(z / s)      (softcap s, Gemma-2)     else c = z
  lse = logsumexp(c)
  loss_i = lse - (1 - eps) c_y - (eps / V) sum_j c_j + zw * lse^2
with eps the label smoothing (PyTorch's definition: (1 - eps) * nll + eps * mean_j(-log p_j)) and zw the
z-loss weight. Ignored rows contribute 0. "sum" returns sum_i loss_i, "mean" divides it by the number of
targets, counted on the device (no host sync); with no targets the loss and every gradient are 0.
The z-loss term zw * lse^2 is INSIDE the loss; with return_z_loss the op also returns it on its own
(zw * the same reduction of lse^2 over targets), detached, for logging.

Backward. With p = softmax(c):
  dloss_i/dc_j = p_j (1 + 2 zw lse) - eps / V - (1 - eps) [j == y]
  dloss_i/dz_j = dloss_i/dc_j * (1 - (c_j / s)^2)            (softcap; 1 without)
  G = [N, V] rows dloss_i/dz (0 for ignored rows),  dH = G W,  dW = G^T H,  db = sum_i G_i
G is never held whole, and all three gradients are accumulated in the forward (grad_weight and grad_bias
in float32, only when they require grad: the head is frozen in LoRA), so backward only scales them by
grad_output (a tiny Triton kernel scales a 16-bit grad_hidden in place, the product in float32).

Tiling, "chunked" path (the default, PATH_POLICY):
  rows are taken in chunks of C rows, C chosen so the chunk's logits ([C, V] in the input dtype) fit
  LOGITS_CHUNK_BYTES. Per chunk: logits = H_c W^T by cuBLAS (torch.mm, fp32 accumulation) into one
  reused buffer; one Triton program per row (_ce_rows_kernel) sweeps V in BLOCK_V tiles twice: pass 1
  an online max/sum-exp in float32 (plus sum_j c_j for smoothing) giving lse and the row loss, pass 2
  writes dloss/dz over the logits in place (input dtype; times 1/targets for "mean", except in
  float16, whose range would flush small probabilities: there backward applies it); then
  dH_c = G_c W (torch.mm straight into grad_hidden's rows) and dW += G_c^T H_c (float32 accumulator).
  Labels outside [0, V) (other than ignore_index) give a NaN loss rather than an out-of-bounds read.
Tiling, "fused" path (CCE-style, opt-in): no logits anywhere in memory.
  _fused_lse_kernel: grid (row blocks, vocab splits); each program computes [BLOCK_N, BLOCK_V] logit
  tiles on chip (tl.dot over H in BLOCK_K steps) for its share of the vocab and keeps a per-row online
  max/sum-exp, target logit and logit sum; the splits' partials ([splits, N], float32) are merged in
  PyTorch. _fused_grad_kernel: grid (row blocks, vocab blocks); each program recomputes its logit tile,
  forms the G tile in registers and atomically adds G W (into a float32 grad_hidden) and G^T H (into
  the float32 grad_weight); tiles whose |G| is all <= FUSED_GRAD_FILTER (all-ignored rows) are skipped.
  It does one GEMM more than the chunked path (the recompute) plus float32 atomics, so it is chosen
  only where measured faster; PATH_POLICY picks per shape.

Inputs: hidden [N, H] and weight [V, H] are made contiguous if they are not (a copy); labels [N] any
integer dtype (converted to int64). hidden and weight must share a dtype (float16, bfloat16, float32 on
the Triton path; the reference also takes float64).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import HAVE_TRITON, INTERPRETED, use_triton
from ._launch import aot_spec, count, dot_precision, empty_output, launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._math import tanh as _tanh
else:  # pragma: no cover - no triton off Linux: only the reference runs; the kernels stay plain functions
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = None

CHUNK_BYTES = 256 * 2**20  # reference: float32 logits of one chunk
LOGITS_CHUNK_BYTES = 256 * 2**20  # chunked Triton path: logits (input dtype) of one chunk

# Which Triton path runs: "chunked" or "fused", or a callable
# (n_rows, vocab, hidden_size, dtype, weight_needs_grad) -> "chunked" | "fused" choosing per shape.
PATH_POLICY = "chunked"
# Fused path: skip a tile's gradient GEMMs when every |dloss/dz| in it is <= this. 0.0 is exact (it only
# skips tiles of ignored rows); CCE uses ~2**-12 for bfloat16, where such terms are below bf16 resolution.
FUSED_GRAD_FILTER = 0.0


def _chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_BYTES // (4 * vocab)))


def _softcapped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The PyTorch reference: the math above, chunked over rows, gradients computed in forward.

    Returns (loss, z_loss); z_loss is already part of loss and is not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index: int, reduction: str, softcap=None,
                label_smoothing: float = 0.0, z_loss_weight: float = 0.0):
        vocab = weight.shape[0]
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        eps, zw = float(label_smoothing), float(z_loss_weight)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        lse_sq = torch.zeros((), dtype=acc, device=hidden.device)
        # Ignored rows add nothing to the loss or to any gradient: only the targets' logits are computed
        # (in supervised fine-tuning most rows are prompt tokens). Finding them syncs, which the reference may.
        rows = (labels != ignore_index).nonzero()[:, 0]
        step = _chunk_rows(len(rows), vocab)
        for start in range(0, len(rows), step):
            picked_rows = rows[start:start + step]
            h = hidden.index_select(0, picked_rows)
            y = labels.index_select(0, picked_rows)
            z = (h @ weight.T).to(acc)
            if bias is not None:
                z += bias.to(acc)
            c = _softcapped(z, softcap)
            lse = torch.logsumexp(c, dim=-1)
            row_loss = lse - (1 - eps) * c.gather(1, y[:, None])[:, 0]
            # The optional terms cost a pass over [rows, vocab] each: on a CPU, where this reference is what
            # runs, those passes are a visible part of the step, so they are made only when asked for.
            if eps:
                row_loss -= eps * c.mean(-1)
            if zw:
                row_loss += zw * lse * lse
                lse_sq += (lse * lse).sum()
            loss += row_loss.sum()
            # softmax(c) = exp(c - lse), in c's own buffer when c is not needed again (no softcap)
            grad_logits = (c if softcap is None else c.clone()).sub_(lse[:, None]).exp_()
            if zw:
                grad_logits *= (1 + 2 * zw * lse)[:, None]
            if eps:
                grad_logits -= eps / vocab
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1 - eps
            if softcap is not None:
                grad_logits *= 1 - (c / softcap) ** 2
            if need_h:
                grad_h.index_copy_(0, picked_rows, (grad_logits.to(hidden.dtype) @ weight).to(hidden.dtype))
            if need_w:
                grad_w += grad_logits.T @ h.to(acc)
            if need_b:
                grad_b += grad_logits.sum(0)
        z_loss = zw * lse_sq
        if reduction == "mean":
            scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).to(acc)
            loss, z_loss = loss * scale, z_loss * scale
            grad_h = grad_h * scale.to(hidden.dtype) if need_h else None
            grad_w = grad_w * scale if need_w else None
            grad_b = grad_b * scale if need_b else None
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None,
                              grad_b.to(bias.dtype) if need_b else None)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else (g.to(grad_loss.dtype) * grad_loss).to(g.dtype)
        return scale(grad_h), scale(grad_w), None, scale(grad_b), None, None, None, None, None


def fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean",
                                         bias=None, *, softcap=None, label_smoothing=0.0, z_loss_weight=0.0,
                                         return_z_loss=False):
    loss, z_loss = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction,
                                                   softcap, label_smoothing, z_loss_weight)
    return (loss, z_loss) if return_z_loss else loss


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # [C, V] chunk logits; overwritten with dloss/dz when COMPUTE_GRAD
    labels_ptr,  # [C] int64
    bias_ptr,  # [V] float32 (read only when HAS_BIAS)
    loss_ptr,  # [C] float32 out: row loss, 0 for ignored rows
    lse_ptr,  # [C] float32 out: row lse, 0 for ignored rows
    grad_scale_ptr,  # [] float32: factor applied to dloss/dz before it is stored
    stride_row,
    V,
    ignore_index,
    softcap,
    label_smoothing,
    z_loss_weight,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    col_tile = tl.arange(0, BLOCK_V)
    if label != ignore_index:
        # pass 1: online max / sum-exp over the vocab, float32
        max_run = tl.full([], float("-inf"), tl.float32)
        sumexp_run = tl.full([], 0.0, tl.float32)
        csum_run = tl.full([], 0.0, tl.float32)
        for v_start in range(0, V, BLOCK_V):
            cols = v_start + col_tile
            col_mask = cols < V
            z_tile = tl.load(row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z_tile += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
            if HAS_SOFTCAP:
                z_tile = softcap * _tanh(z_tile / softcap)
            c_tile = tl.where(col_mask, z_tile, float("-inf"))
            max_new = tl.maximum(max_run, tl.max(c_tile, 0))
            sumexp_run = sumexp_run * tl.exp(max_run - max_new) + tl.sum(tl.exp(c_tile - max_new), 0)
            max_run = max_new
            if HAS_SMOOTHING:
                csum_run += tl.sum(tl.where(col_mask, z_tile, 0.0), 0)
        lse = max_run + tl.log(sumexp_run)

        # a label outside [0, V) reads nothing and poisons the loss (NaN) instead of faulting
        label_ok = (label >= 0) & (label < V)
        z_target = tl.load(row_ptr + label, mask=label_ok, other=float("nan")).to(tl.float32)
        if HAS_BIAS:
            z_target += tl.load(bias_ptr + label, mask=label_ok, other=0.0)
        if HAS_SOFTCAP:
            z_target = softcap * _tanh(z_target / softcap)
        row_loss = lse - (1.0 - label_smoothing) * z_target + z_loss_weight * lse * lse
        if HAS_SMOOTHING:
            row_loss -= label_smoothing / V * csum_run
        tl.store(loss_ptr + row, row_loss)
        tl.store(lse_ptr + row, lse)

        if COMPUTE_GRAD:
            # pass 2: dloss/dz, times grad_scale (1/targets for "mean", except in float16, where that would
            # flush small probabilities to 0 at large N: there backward applies it)
            grad_scale = tl.load(grad_scale_ptr)
            p_coef = 1.0 + 2.0 * z_loss_weight * lse
            smooth = label_smoothing / V
            for v_start in range(0, V, BLOCK_V):
                cols = v_start + col_tile
                col_mask = cols < V
                z_tile = tl.load(row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    z_tile += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
                if HAS_SOFTCAP:
                    capped = _tanh(z_tile / softcap)
                    z_tile = softcap * capped
                grad_tile = tl.exp(z_tile - lse) * p_coef - smooth
                grad_tile = tl.where(cols == label, grad_tile - (1.0 - label_smoothing), grad_tile)
                if HAS_SOFTCAP:
                    grad_tile = grad_tile * (1.0 - capped * capped)
                grad_tile = grad_tile * grad_scale
                tl.store(row_ptr + cols, grad_tile.to(logits_ptr.dtype.element_ty), mask=col_mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_tile = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for v_start in range(0, V, BLOCK_V):
                cols = v_start + col_tile
                tl.store(row_ptr + cols, zero_tile, mask=cols < V)


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_V] float32 logits c (softcapped when HAS_SOFTCAP), and tanh(z / s) for the softcap
    derivative."""
    k_tile = tl.arange(0, BLOCK_K)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * H
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * H
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k_start in range(0, H, BLOCK_K):
        ks = k_start + k_tile
        k_mask = ks < H
        h_tile = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(h_tile, tl.trans(w_tile), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    capped = acc
    if HAS_SOFTCAP:
        capped = _tanh(acc / softcap)
        acc = softcap * capped
    return acc, capped


@triton.jit
def _fused_lse_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] float32 (read only when HAS_BIAS)
    labels_ptr,  # [N] int64
    part_max_ptr,  # [splits, N] float32 out: running max of the split's logits
    part_sumexp_ptr,  # [splits, N] float32 out: sum exp(c - max) over the split
    part_target_ptr,  # [splits, N] float32 out: c[label] if the label falls in the split, else 0
    part_csum_ptr,  # [splits, N] float32 out: sum of c over the split (HAS_SMOOTHING)
    N,
    V,
    H,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    col_tile = tl.arange(0, BLOCK_V)
    max_run = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sumexp_run = tl.zeros([BLOCK_N], dtype=tl.float32)
    target_run = tl.zeros([BLOCK_N], dtype=tl.float32)
    csum_run = tl.zeros([BLOCK_N], dtype=tl.float32)
    # vocab blocks split, pid_s, pid_s + splits, ...: the splits interleave so their work stays even
    for v_block in range(split, tl.cdiv(V, BLOCK_V), n_splits):
        cols = v_block * BLOCK_V + col_tile
        col_mask = cols < V
        c_tile, _ = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H, softcap,
                                HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        if HAS_SMOOTHING:
            csum_run += tl.sum(tl.where(col_mask[None, :], c_tile, 0.0), 1)
        target_run += tl.sum(tl.where(cols[None, :] == labels[:, None], c_tile, 0.0), 1)
        c_tile = tl.where(col_mask[None, :], c_tile, float("-inf"))
        max_new = tl.maximum(max_run, tl.max(c_tile, 1))
        sumexp_run = sumexp_run * tl.exp(max_run - max_new) + tl.sum(tl.exp(c_tile - max_new[:, None]), 1)
        max_run = max_new
    out = split.to(tl.int64) * N + rows
    tl.store(part_max_ptr + out, max_run, mask=row_mask)
    tl.store(part_sumexp_ptr + out, sumexp_run, mask=row_mask)
    tl.store(part_target_ptr + out, target_run, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(part_csum_ptr + out, csum_run, mask=row_mask)


@triton.jit
def _fused_grad_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] float32 (read only when HAS_BIAS)
    labels_ptr,  # [N] int64
    lse_ptr,  # [N] float32 from _fused_lse_kernel
    grad_scale_ptr,  # [] float32: factor applied to dloss/dz before the gradient GEMMs
    grad_h_ptr,  # [N, H] float32, accumulated atomically (NEED_H)
    grad_w_ptr,  # [V, H] float32, accumulated atomically (NEED_W)
    grad_b_ptr,  # [V] float32, accumulated atomically (NEED_B)
    N,
    V,
    H,
    ignore_index,
    softcap,
    label_smoothing,
    z_loss_weight,
    grad_filter,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    keep = row_mask & (labels != ignore_index)
    if tl.sum(keep.to(tl.int32), 0) > 0:
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        c_tile, capped = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H,
                                     softcap, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        p_coef = 1.0 + 2.0 * z_loss_weight * lse
        grad_tile = tl.exp(c_tile - lse[:, None]) * p_coef[:, None] - label_smoothing / V
        grad_tile = tl.where(cols[None, :] == labels[:, None], grad_tile - (1.0 - label_smoothing), grad_tile)
        if HAS_SOFTCAP:
            grad_tile = grad_tile * (1.0 - capped * capped)
        grad_tile = tl.where(keep[:, None] & col_mask[None, :], grad_tile, 0.0)
        keep_tile = tl.max(tl.abs(grad_tile)) > grad_filter
        grad_tile = grad_tile * tl.load(grad_scale_ptr)
        if NEED_B:
            tl.atomic_add(grad_b_ptr + cols, tl.sum(grad_tile, 0), mask=col_mask, sem="relaxed")
        if keep_tile:
            grad_lo = grad_tile.to(hidden_ptr.dtype.element_ty)
            k_tile = tl.arange(0, BLOCK_K)
            row_off = rows.to(tl.int64)[:, None] * H
            col_off = cols.to(tl.int64)[:, None] * H
            for k_start in range(0, H, BLOCK_K):
                ks = k_start + k_tile
                row_k_mask = row_mask[:, None] & (ks < H)[None, :]
                col_k_mask = col_mask[:, None] & (ks < H)[None, :]
                if NEED_H:
                    w_tile = tl.load(weight_ptr + col_off + ks[None, :], mask=col_k_mask, other=0.0)
                    dh_part = tl.dot(grad_lo, w_tile, input_precision=DOT_PRECISION)
                    tl.atomic_add(grad_h_ptr + row_off + ks[None, :], dh_part, mask=row_k_mask, sem="relaxed")
                if NEED_W:
                    h_tile = tl.load(hidden_ptr + row_off + ks[None, :], mask=row_k_mask, other=0.0)
                    dw_part = tl.dot(tl.trans(grad_lo), h_tile, input_precision=DOT_PRECISION)
                    tl.atomic_add(grad_w_ptr + col_off + ks[None, :], dw_part, mask=col_k_mask, sem="relaxed")


@triton.jit
def _scale_kernel(x_ptr, factor_ptr, n_elements, BLOCK: tl.constexpr):
    """x *= factor in place, the product in float32 (a 0-dim factor tensor would be rounded to x's dtype by
    torch's mul_, e.g. 1/targets to 8 bits in bfloat16)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    factor = tl.load(factor_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(x_ptr + offs, (x.to(tl.float32) * factor).to(x_ptr.dtype.element_ty), mask=mask)


# Launch configurations. The interpreter runs one small fixed config (it is slow and times nothing); on a GPU
# the row kernel is autotuned per vocab size and variant, restoring the logits it overwrites in place between
# trials, and the fused kernels likewise, zeroing the gradient accumulators between trials.
_INTERP_ROWS = {"BLOCK_V": 256}
_INTERP_FUSED = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 32}
_ROWS_KEY = ["V", "HAS_BIAS", "HAS_SOFTCAP", "HAS_SMOOTHING", "COMPUTE_GRAD"]
_FUSED_KEY = ["V", "H", "HAS_BIAS", "HAS_SOFTCAP"]

if HAVE_TRITON and not INTERPRETED:
    _ce_rows = triton.autotune(
        configs=[triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in ((2048, 8), (4096, 8), (4096, 16),
                                                                            (8192, 16))],
        key=_ROWS_KEY, restore_value=["logits_ptr"])(_ce_rows_kernel)
    _fused_configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                      for bn, bv, bk, w, s in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                                               (64, 256, 64, 8, 3), (128, 64, 64, 4, 4))]
    _fused_lse = triton.autotune(configs=_fused_configs,
                                 key=_FUSED_KEY + ["HAS_SMOOTHING"])(_fused_lse_kernel)
    _fused_grad = triton.autotune(configs=_fused_configs, key=_FUSED_KEY + ["NEED_H", "NEED_W", "NEED_B"],
                                  reset_to_zero=["grad_h_ptr", "grad_w_ptr", "grad_b_ptr"],
                                  )(_fused_grad_kernel)
else:
    _ce_rows = _fused_lse = _fused_grad = None


def _rows_kernel(n_rows, *args, **flags):
    """_ce_rows_kernel over the n_rows rows of a logits chunk, one program per row."""
    launch(_ce_rows_kernel, _ce_rows, (n_rows,), *args, interpreted=_INTERP_ROWS, **flags)


def _scale_(x, factor):
    """x (contiguous, float16/bfloat16) *= factor (0-dim float32 tensor on x's device), in place."""
    block, warps = (1024, 4) if INTERPRETED else (4096, 8)
    _scale_kernel[(triton.cdiv(x.numel(), block),)](x, factor, x.numel(), BLOCK=block, num_warps=warps)
    return x


_ADDMM_OUT_DTYPE: list = [None]  # does torch.addmm(..., out_dtype=float32) run here? learnt on first use


def _addmm_fp32_(acc, a, b):
    """acc (float32) += a @ b for a, b in the input dtype, accumulated in float32 across calls."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _ADDMM_OUT_DTYPE[0] is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # cuBLAS, C in float32: no temporary
            _ADDMM_OUT_DTYPE[0] = True
            return
        except (RuntimeError, TypeError):  # older torch: self must match the inputs' dtype
            _ADDMM_OUT_DTYPE[0] = False
    # row blocks of acc, so the product's temporary stays within the chunk budget
    rows = max(1, LOGITS_CHUNK_BYTES // (acc.shape[1] * 4))
    for r in range(0, acc.shape[0], rows):
        if acc.is_cuda:
            acc[r:r + rows] += a[r:r + rows] @ b
        else:  # CPU (interpreter tests): upcast, the CPU has no low-precision GEMM worth keeping
            acc[r:r + rows].addmm_(a[r:r + rows].float(), b.float())


def _triton_chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    cap = max(1, LOGITS_CHUNK_BYTES // (vocab * itemsize))
    if cap >= n_rows:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // cap)
    return -(-n_rows // n_chunks)  # even chunks: no tiny last chunk starving the GEMMs


def _chunked_pass(hidden, weight, labels, bias32, ignore_index, softcap, eps, zw, grad_scale, need_h, need_w,
                  need_b):
    """Summed row losses, row lse and the accumulated gradients (times grad_scale), chunk by chunk."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    loss_rows = empty_output((n_rows,), torch.float32, dev)
    lse_rows = empty_output((n_rows,), torch.float32, dev)
    grad_h = empty_output(hidden.shape, hidden.dtype, dev) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    compute_grad = need_h or need_w or need_b
    step = _triton_chunk_rows(n_rows, vocab, hidden.element_size())
    logits_buf = empty_output((min(step, n_rows), vocab), hidden.dtype, dev)
    flags = dict(HAS_BIAS=bias32 is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=eps > 0.0,
                 COMPUTE_GRAD=compute_grad)
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        h = hidden[start:stop]
        logits = logits_buf[:stop - start]
        torch.mm(h, weight.T, out=logits)
        _rows_kernel(stop - start, logits, labels[start:stop], bias32 if bias32 is not None else loss_rows,
                     loss_rows[start:stop], lse_rows[start:stop], grad_scale, logits.stride(0), vocab,
                     ignore_index, float(softcap or 0.0), eps, zw, **flags)
        # logits now holds dloss/dz of the chunk
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:stop])
        if need_w:
            _addmm_fp32_(grad_w, logits.T, h)
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    return loss_rows.sum(), lse_rows, grad_h, grad_w, grad_b


def _fused_splits(n_row_blocks: int, n_vocab_blocks: int, device) -> int:
    if device.type != "cuda":
        return min(2, n_vocab_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_vocab_blocks, -(-4 * sms // n_row_blocks)))


def _fused_pass(hidden, weight, labels, bias32, ignore_index, softcap, eps, zw, grad_scale, need_h, need_w,
                need_b):
    """Summed row losses, row lse and the accumulated gradients (times grad_scale), no logits in memory."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    keep = labels != ignore_index
    # splits from the largest row block of the autotune list: a smaller block only raises the parallelism
    row_block = _INTERP_FUSED["BLOCK_N"] if INTERPRETED else 128
    splits = _fused_splits(-(-n_rows // row_block), -(-vocab // 128), dev)
    parts = empty_output((4, splits, n_rows), torch.float32, dev)
    common = dict(HAS_BIAS=bias32 is not None, HAS_SOFTCAP=softcap is not None,
                  DOT_PRECISION=dot_precision(hidden.dtype))
    # stands in for absent optional buffers; never lse_rows etc.: autotune zeroes the grad buffers it gets
    unused = torch.zeros(1, **f32)
    bias_arg = bias32 if bias32 is not None else unused
    launch(_fused_lse_kernel, _fused_lse, lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits),
           hidden, weight, bias_arg, labels, parts[0], parts[1], parts[2], parts[3], n_rows, vocab, hidden_size,
           float(softcap or 0.0), interpreted=_INTERP_FUSED, HAS_SMOOTHING=eps > 0.0, **common)
    part_max, part_sumexp, part_target, part_csum = parts
    row_max = part_max.amax(0)
    lse = row_max + torch.log((part_sumexp * torch.exp(part_max - row_max)).sum(0))
    row_loss = lse - (1.0 - eps) * part_target.sum(0) + zw * lse * lse
    if eps > 0.0:
        row_loss = row_loss - eps / vocab * part_csum.sum(0)
    label_ok = (labels >= 0) & (labels < vocab)
    row_loss = torch.where(label_ok, row_loss, float("nan"))  # as the chunked path: a bad label poisons
    loss_rows = torch.where(keep, row_loss, 0.0)
    lse_rows = torch.where(keep, lse, 0.0)
    del parts, part_max, part_sumexp, part_target, part_csum

    grad_h = torch.zeros((n_rows, hidden_size), **f32) if need_h else None
    grad_w = torch.zeros((vocab, hidden_size), **f32) if need_w else None
    grad_b = torch.zeros(vocab, **f32) if need_b else None
    if need_h or need_w or need_b:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))
        outs = [g if g is not None else unused for g in (grad_h, grad_w, grad_b)]
        launch(_fused_grad_kernel, _fused_grad, grid, hidden, weight, bias_arg, labels, lse_rows, grad_scale,
               *outs, n_rows, vocab, hidden_size, ignore_index, float(softcap or 0.0), eps, zw,
               float(FUSED_GRAD_FILTER), interpreted=_INTERP_FUSED, NEED_H=need_h, NEED_W=need_w, NEED_B=need_b,
               **common)
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
    return loss_rows.sum(), lse_rows, grad_h, grad_w, grad_b


def _pick_path(n_rows, vocab, hidden_size, dtype, weight_needs_grad) -> str:
    policy = PATH_POLICY
    path = policy(n_rows, vocab, hidden_size, dtype, weight_needs_grad) if callable(policy) else policy
    if path not in ("chunked", "fused"):
        raise ValueError(f"PATH_POLICY must give 'chunked' or 'fused', got {path!r}")
    return path


# ----------------------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------------------


class TritonLinearCrossEntropy(torch.autograd.Function):
    """The Triton paths: gradients accumulated in forward; backward scales them once by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index: int, reduction: str, softcap,
                label_smoothing, z_loss_weight):
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        hidden, weight = hidden.contiguous(), weight.contiguous()
        labels = labels.contiguous().to(torch.int64)
        bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
        eps, zw = float(label_smoothing), float(z_loss_weight)
        path = _pick_path(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, need_w)
        run = _chunked_pass if path == "chunked" else _fused_pass
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        if reduction == "mean":  # targets counted on the device: no sync
            scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
        # the kernels fold the scale into dloss/dz, except in float16, whose range would flush the small
        # probabilities of a large batch to 0: there the gradients stay unscaled until backward
        late_scale = hidden.dtype == torch.float16 and reduction == "mean"
        kernel_scale = torch.ones_like(scale) if late_scale else scale
        loss, lse_rows, grad_h, grad_w, grad_b = run(hidden, weight, labels, bias32, ignore_index, softcap,
                                                     eps, zw, kernel_scale, need_h, need_w, need_b)
        z_loss = zw * lse_rows.square().sum() if zw else torch.zeros_like(scale)
        loss, z_loss = loss * scale, z_loss * scale
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.scale = scale if late_scale else None
        ctx.out_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the same call; its "
                               "gradients are computed in forward and consumed by the first backward")
        grads, ctx.grads = ctx.grads, None
        factor = grad_loss.to(torch.float32)
        if ctx.scale is not None:
            factor = factor * ctx.scale
        out = []
        for grad, dtype in zip(grads, ctx.out_dtypes, strict=True):
            if grad is None:
                out.append(None)
            elif grad.dtype == dtype == torch.float32:
                out.append(grad.mul_(factor))
            elif grad.dtype == dtype:  # grad_hidden in 16 bits: scaled where it lies, no second [N, H]
                out.append(_scale_(grad, factor))
            else:
                out.append((grad * factor).to(dtype))
        return out[0], out[1], None, out[2], None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean",
                               bias=None, *, softcap: float | None = None, label_smoothing: float = 0.0,
                               z_loss_weight: float = 0.0, return_z_loss: bool = False):
    """Loss of logits hidden @ weight.T (+ bias) against labels, never building [N, V] logits.

    hidden [N, H]; weight [V, H]; labels [N] integer, aligned (labels[i] is the target of row i); bias [V].
    reduction "mean" divides by the number of labels != ignore_index (0 targets: loss 0, gradients 0);
    "sum" is the plain sum. Options (all off by default):
      softcap: logits become softcap * tanh(logits / softcap) before the softmax (Gemma-2).
      label_smoothing: PyTorch's F.cross_entropy label_smoothing.
      z_loss_weight: adds z_loss_weight * lse^2 per target row, reduced like the loss, INTO the loss.
      return_z_loss: return (loss, z_loss), z_loss being that added term on its own, detached (for logging;
        its gradient already flows through loss).
    Returns a float32 scalar (float64 for float64 inputs on the reference path).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H] and labels [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[1]} does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not z_loss_weight >= 0.0:
        raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight!r}")
    softcap = None if softcap is None else float(softcap)
    if use_triton(hidden):
        if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton fused_linear_cross_entropy takes float16, bfloat16 or float32, not "
                            f"{hidden.dtype}; set LORAFUSE_KERNELS=reference for the PyTorch reference")
        count("fused_linear_cross_entropy")
        loss, z_loss = TritonLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction,
                                                      softcap, float(label_smoothing), float(z_loss_weight))
    else:
        loss, z_loss = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction,
                                                       softcap, float(label_smoothing), float(z_loss_weight))
    return (loss, z_loss) if return_z_loss else loss


# Ahead-of-time compile checks (python -m lorafuse.kernels.aot): the variants that matter on a GPU. Arguments
# not listed here are the input dtype's tensors (*_ptr) or i32.
_AOT_TYPES = {"labels_ptr": "*i64",
              "bias_ptr loss_ptr lse_ptr grad_scale_ptr part_max_ptr part_sumexp_ptr part_target_ptr part_csum_ptr "
              "grad_h_ptr grad_w_ptr grad_b_ptr factor_ptr": "*fp32",
              "softcap label_smoothing z_loss_weight grad_filter": "fp32", "n_elements": "i64"}


def _rows_flags(bias, cap, smooth, grad, block_v):
    return {"HAS_BIAS": bias, "HAS_SOFTCAP": cap, "HAS_SMOOTHING": smooth, "COMPUTE_GRAD": grad,
            "BLOCK_V": block_v}


AOT_SPECS = [
    # the LoRA hot path: bf16, plain CE with gradient; the autotune list's block sizes
    aot_spec(_ce_rows_kernel, "bf16", _rows_flags(False, False, False, True, 4096), types=_AOT_TYPES),
    aot_spec(_ce_rows_kernel, "bf16", _rows_flags(True, True, True, True, 8192), types=_AOT_TYPES),
    aot_spec(_ce_rows_kernel, "fp32", _rows_flags(False, True, False, False, 2048), types=_AOT_TYPES),
    # fused path, every option on, the largest tiles of its autotune list
    aot_spec(_fused_lse_kernel, "bf16", {"HAS_BIAS": True, "HAS_SOFTCAP": True, "HAS_SMOOTHING": True,
                                         "DOT_PRECISION": "tf32", "BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64},
             types=_AOT_TYPES),
    aot_spec(_fused_grad_kernel, "bf16", {"HAS_BIAS": True, "HAS_SOFTCAP": True, "NEED_H": True, "NEED_W": True,
                                          "NEED_B": True, "DOT_PRECISION": "tf32", "BLOCK_N": 64, "BLOCK_V": 256,
                                          "BLOCK_K": 64}, types=_AOT_TYPES),
    aot_spec(_fused_grad_kernel, "fp32", {"HAS_BIAS": False, "HAS_SOFTCAP": False, "NEED_H": True, "NEED_W": False,
                                          "NEED_B": False, "DOT_PRECISION": "ieee", "BLOCK_N": 64, "BLOCK_V": 128,
                                          "BLOCK_K": 32}, types=_AOT_TYPES),
    # backward's in-place scaling of a 16-bit grad_hidden
    aot_spec(_scale_kernel, "bf16", {"BLOCK": 4096}, types=_AOT_TYPES),
] if HAVE_TRITON else []

"""Padding-free (varlen) attention over packed documents, with GQA, sliding windows and softcapping.

q [T, Hq, D]; k, v [T, Hkv, D], Hq % Hkv == 0 (query head h reads key/value head h // (Hq/Hkv));
documents are the rows cu_seqlens[b] : cu_seqlens[b+1]. Within a document, for query i:
  out_i = sum_j softmax_j(c_ij) v_j   over the keys j of the same document that i sees:
    all of them;  j <= i if causal;  i - window < j <= i with a sliding window (causal only; window = 1 is
    the diagonal alone, a window at least as long as the document is plain causal; flash-attn's
    window_size=(window - 1, 0), HF's sliding_window)
  c_ij = s_ij = scale * q_i . k_j,  or with softcapping  c_ij = softcap * tanh(s_ij / softcap)  (Gemma 2)
No token attends across documents. Same layout as flash-attn's varlen API.

Forward (flash-attention 2, online softmax in base 2 with log2(e) folded into the scale):
  c'_ij = log2(e) * c_ij;  m_i = running max_j c'_ij;  l_i = sum_j 2^(c'_ij - m_i)
  out_i = (sum_j 2^(c'_ij - m_i) v_j) / l_i;  lse2_i = m_i + log2 l_i   (stored in base 2)
  q is multiplied by scale log2(e) once per program, so a block's dot gives c' directly; dK/dV scales its
  [keys, queries] scores instead, in the FFMA that subtracts lse (a scaled k would sit in registers).
Backward, with P_ij = exp(c_ij - lse_i) = 2^(c'_ij - lse2_i) recomputed from the stored lse2:
  delta_i = sum_d dout_id out_id = sum_j P_ij dP_ij,   dP_ij = dout_i . v_j
  dS_ij = P_ij (dP_ij - delta_i) * dc_ij/ds_ij,  where dc/ds = 1, or 1 - tanh^2(s_ij / softcap) with softcapping
  dv_j = sum_i P_ij dout_i;  dk_j = scale sum_i dS_ij q_i;  dq_i = scale sum_j dS_ij k_j
For GQA, dk/dv of a key/value head sum the terms of every query head of its group.

Tiling. Work is a list of (document, tile) pairs: a tile is TILE rows of one document (the last
tile of a document may be partial), so a batch of thousands of short documents launches one
program per real tile and head, never a program per (document, max_seqlen block). The list is
built on the device from cu_seqlens (tiles per document, their cumsum, and a searchsorted that
maps each program to its document) without a host sync; the grid is the host-side upper bound
cdiv(T, TILE) + B tiles (each document adds at most one partial tile), and programs past the
real number of tiles exit at once. The lists are built once per cu_seqlens tensor (a micro-batch's) and
shared by every layer's forward and backward (_schedule). The same TILE-row list drives the three main kernels:
- forward: one program per (query tile, query head); it walks key blocks of BLOCK_N. For causal,
  key blocks before the tile's first row are never masked; only the blocks on the diagonal are.
  With a window, the walk starts at the block holding key start_m - window + 1 (the first row's
  first key): blocks before it are outside every row's window and never loaded. The blocks from
  there up to the one holding start_m + TILE - window (the last row's first key) straddle the
  window's lower edge and are masked; the blocks after them, up to the tile's first row, are not.
- dk/dv: one program per (key tile, key/value head); one flat loop walks the (query head of the group,
  query block of BLOCK_M) pairs, each head's blocks from the diagonal down to the document's end,
  accumulating dk and dv in registers (no atomics, so no races and bitwise-reproducible results).
  With a window the walk stops at query start_n + TILE - 1 + window (exclusive: the tile's last key
  leaves every later query's window). Every block is masked (one copy of the loop body: at D = 128 a
  128-key tile's two float32 accumulators take half the registers, and a second copy, or a loop nested
  in the heads' loop, spills); rows past the document read lse = +inf, so their P is 0 unmasked.
- dq: one program per (query tile, query head), walking key blocks like the forward (window included).
- a preprocess kernel computes delta = rowsum(dout * out) per (head, token).
The window and the cap are runtime arguments behind constexpr switches (WINDOWED, SOFTCAP), so the plain
causal kernels compile as before; a window of T tokens or more is dropped on the host (no document is
longer). The heavy-first tile order stays: a window only flattens the heavy end of a document's tiles.
Saved for backward: q, k, v (as given, views included), out, lse2 [Hq, T] float32 (base 2) and the tile
list; with kv_again, the inputs k and v are computed from instead of k and v. Recomputed in backward: the
scores, their cap and the probabilities (and k, v with kv_again).

Inputs may be strided views (for instance q, k, v split from one fused qkv projection, whose token
stride exceeds H * D): the kernels take token and head strides and copy nothing, as long as the
head dimension is contiguous (stride 1; otherwise that input is made contiguous). The output and
the gradients are contiguous. Offsets along tokens are int64. Head dims that are not a power of
two (80, 96) are padded to the next one with masks. On GPU, float32 inputs use TF32 dots.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, INTERPRETED, use_triton
from ._launch import aot_spec, arch_autotune, count, device_arch, empty_output, launch


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, softmax_scale=None,
                               window: int | None = None, softcap: float | None = None):
    """One SDPA call per document (host loop over cu_seqlens); a window becomes SDPA's boolean mask. With
    softcap (which SDPA lacks), the eager attention of HF's Gemma 2: scores, cap, mask, softmax in at least
    float32, then the product with v in the inputs' dtype.

    The documents are `split` by length, not sliced: the backward of a slice fills a zero tensor of the whole
    batch per document and sums them, split's concatenates the pieces once. Plain causal documents go to SDPA
    as [1, H, L, D] with enable_gqa: a 4-D input reaches SDPA's fused CPU kernel (a 3-D one its math path),
    and the key/value heads are not repeated in memory. Masked ones (window, softcap) keep the math path,
    whose softmax is exact where a row sees one key (window 1: dq exactly 0)."""
    check_window_softcap(causal, window, softcap)
    group = q.shape[1] // k.shape[1]
    lengths = cu_seqlens.diff().tolist()
    outs = []
    for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        qd, kd, vd = qd.transpose(0, 1), kd.transpose(0, 1), vd.transpose(0, 1)  # [H, L, D]
        if window is None and softcap is None:
            od = F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=causal, scale=softmax_scale,
                                                enable_gqa=group > 1)[0]
        else:
            kd, vd = kd.repeat_interleave(group, dim=0), vd.repeat_interleave(group, dim=0)
            od = _masked_attention(qd, kd, vd, causal, softmax_scale, window, softcap)
        outs.append(od.transpose(0, 1))
    return torch.cat(outs, dim=0)


def _masked_attention(qd, kd, vd, causal, softmax_scale, window, softcap):
    """One document [H, L, D]: query i attends key j when j <= i (causal) and i - j < window."""
    pos = torch.arange(qd.shape[1], device=qd.device)
    visible = torch.ones(qd.shape[1], qd.shape[1], dtype=torch.bool, device=qd.device)
    if causal:
        visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible = visible & (pos[:, None] - pos[None, :] < window)
    if softcap is None:
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=visible, scale=softmax_scale)
    scale = softmax_scale if softmax_scale is not None else qd.shape[-1] ** -0.5
    scores = qd @ kd.transpose(1, 2) * scale
    scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1, dtype=torch.promote_types(scores.dtype,
                                                                                              torch.float32))
    return probs.to(vd.dtype) @ vd


def check_window_softcap(causal, window, softcap):
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window must be a positive int (keys within window - 1 positions before the query, "
                             f"itself included) or None; got {window!r}")
        if not causal:
            raise ValueError("window needs causal=True (a sliding window is causal: i - window < j <= i)")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and 0 < softcap < math.inf):
        raise ValueError(f"softcap must be a positive finite number or None; got {softcap!r}")


def check_varlen_args(q, k, v, cu_seqlens, max_seqlen):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D], k and v [T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [B+1]")
    if not isinstance(max_seqlen, int):
        raise TypeError("max_seqlen must be a Python int (taken from the host, so no device sync)")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 256

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._math import tanh

    @triton.jit
    def _locate_tile(tile_doc_ptr, tile_end_ptr, cu_ptr, pid_tile, n_docs, TILE: tl.constexpr,
                     HEAVY_LAST: tl.constexpr):
        """(document, first row of the tile, document start, document length) of a program's tile.

        Tiles of a document are handed out heaviest first (for causal work the heavy tiles are the
        last query tiles, HEAVY_LAST, or the first key tiles; a window only flattens the slope) so the
        long programs start early and the short ones fill the tail of the grid. doc == n_docs marks a
        program past the real tiles.
        """
        doc = tl.load(tile_doc_ptr + pid_tile)
        safe_doc = tl.minimum(doc, n_docs - 1)
        seq_start = tl.load(cu_ptr + safe_doc)
        seq_len = tl.load(cu_ptr + safe_doc + 1) - seq_start
        n_tiles = (seq_len + TILE - 1) // TILE
        rank = pid_tile - (tl.load(tile_end_ptr + safe_doc) - n_tiles)
        if HEAVY_LAST:
            rank = n_tiles - 1 - rank
        return doc, rank * TILE, seq_start, seq_len

    @triton.jit
    def _scores(qk2, softcap_log2, SOFTCAP: tl.constexpr):
        """Base-2 scores of a block of products q.k whose q (or k) was scaled by scale log2(e) once, before the
        loop, and the tanh of the cap (the backward's 1 - tanh^2): qk2 itself, or with SOFTCAP
        softcap log2(e) tanh(qk2 / (softcap log2(e))) = softcap log2(e) tanh(scale q.k / softcap)."""
        capped = qk2
        scores = qk2
        if SOFTCAP:
            capped = tanh(qk2 * (1.0 / softcap_log2))
            scores = capped * softcap_log2
        return scores, capped

    @triton.jit
    def _visible(q_pos, k_pos, in_doc, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
        """Which (query, key) pairs of a block attend: q_pos, k_pos broadcastable positions within the
        document, in_doc the pairs whose query and key lie in it; causal: k <= q; window: q - k < window."""
        keep = in_doc
        if CAUSAL:
            keep = keep & (q_pos >= k_pos)
        if WINDOWED:
            keep = keep & (q_pos - k_pos < window)
        return keep

    @triton.jit
    def _window_key_range(start_m, window, TILE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key blocks of a query tile [start_m, start_m + TILE) under a window: [lo, full_lo) straddle
        the window's lower edge (masked), [full_lo, start_m) lie inside every row's window (unmasked);
        keys before lo are outside every row's window (skipped). Row i sees keys j > i - window."""
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.cdiv(tl.maximum(start_m + TILE - window, 0), BLOCK_N) * BLOCK_N, start_m)
        return lo, full_lo

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, stride_kt, stride_vt, seq_start, seq_len,
                   offs_m, lo, hi, softcap_log2, window,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tok_n = (seq_start + offs_n).to(tl.int64)
            if MASKED:
                col_ok = offs_n < seq_len
                kT_tile = tl.load(k_base + tok_n[None, :] * stride_kt + offs_d[:, None],
                                  mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            else:
                kT_tile = tl.load(k_base + tok_n[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None],
                                  other=0.0)
            scores, _ = _scores(tl.dot(q_tile, kT_tile), softcap_log2, SOFTCAP)
            if MASKED:
                keep = _visible(offs_m[:, None], offs_n[None, :], col_ok[None, :], window, CAUSAL, WINDOWED)
                # a finite floor, not -inf: a row with no visible key in this block stays NaN-free
                scores = tl.where(keep, scores, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.math.exp2(scores - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if MASKED:
                v_tile = tl.load(v_base + tok_n[:, None] * stride_vt + offs_d[None, :],
                                 mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                v_tile = tl.load(v_base + tok_n[:, None] * stride_vt + offs_d[None, :], mask=d_ok[None, :],
                                 other=0.0)
            acc = tl.dot(p.to(v_tile.dtype), v_tile, acc)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _varlen_fwd_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_ptr, tile_doc_ptr, tile_end_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        n_tokens, n_docs, n_heads, group, scale_log2, softcap_log2, window,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOWED: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    ):
        # the unmasked pass stops at the tile's first row (a multiple of TILE): a key block straddling
        # that line would skip the causal mask (a failed assert makes the autotuner drop the config)
        tl.static_assert(TILE % BLOCK_N == 0, "the key block must divide the query tile")
        # heads vary fastest so the query heads of one GQA group run side by side on the same K/V
        pid = tl.program_id(0)
        head = pid % n_heads
        doc, start_m, seq_start, seq_len = _locate_tile(tile_doc_ptr, tile_end_ptr, cu_ptr, pid // n_heads,
                                                        n_docs, TILE, CAUSAL)
        if doc >= n_docs:
            return
        kv_head = head // group
        offs_m = start_m + tl.arange(0, TILE)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        row_ok = offs_m < seq_len
        d_ok = offs_d < HEAD_DIM
        tok_m = (seq_start + offs_m).to(tl.int64)
        q_tile = tl.load(q_ptr + head * stride_qh + tok_m[:, None] * stride_qt + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # scaled once here, not every score block in the loop: q.k then comes out in base-2 units
        q_tile = (q_tile.to(tl.float32) * scale_log2).to(q_tile.dtype)
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh

        acc = tl.zeros([TILE, HEAD_DIM_PAD], dtype=tl.float32)
        l_i = tl.zeros([TILE], dtype=tl.float32)
        m_i = tl.full([TILE], -1.0e30, dtype=tl.float32)
        if CAUSAL:
            full_lo = 0
            if WINDOWED:
                # keys before the window's lower edge are skipped; the blocks straddling it are masked
                lo, full_lo = _window_key_range(start_m, window, TILE, BLOCK_N)
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, stride_kt, stride_vt, seq_start,
                                           seq_len, offs_m, lo, full_lo, softcap_log2, window,
                                           HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, True)
            # keys before the tile's first row (and inside every row's window) are visible to every row: no mask
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, stride_kt, stride_vt, seq_start,
                                       seq_len, offs_m, full_lo, start_m, softcap_log2, window,
                                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, False)
            diag_hi = tl.minimum(start_m + TILE, seq_len)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, stride_kt, stride_vt, seq_start,
                                       seq_len, offs_m, start_m, diag_hi, softcap_log2, window,
                                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, True)
        else:
            full_hi = (seq_len // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, stride_kt, stride_vt, seq_start,
                                       seq_len, offs_m, 0, full_hi, softcap_log2, window,
                                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, False)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, stride_kt, stride_vt, seq_start,
                                       seq_len, offs_m, full_hi, seq_len, softcap_log2, window,
                                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, True)

        # every stored row saw at least one key, so l_i >= 1 there; the guard only covers padding rows
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out_tile = acc / l_safe[:, None]
        tl.store(out_ptr + head * stride_oh + tok_m[:, None] * stride_ot + offs_d[None, :],
                 out_tile.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse_row = m_i + tl.math.log2(l_safe)  # base 2, as the backward uses it
        tl.store(lse_ptr + head.to(tl.int64) * n_tokens + tok_m, lse_row, mask=row_ok)

    @triton.jit
    def _varlen_bwd_preprocess_kernel(
        out_ptr, dout_ptr, delta_ptr, n_tokens, n_heads,
        stride_ot, stride_oh, stride_dot, stride_doh,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        head = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        tok = offs_t.to(tl.int64)
        mask = (offs_t < n_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
        out_tile = tl.load(out_ptr + head * stride_oh + tok[:, None] * stride_ot + offs_d[None, :],
                           mask=mask, other=0.0)
        dout_tile = tl.load(dout_ptr + head * stride_doh + tok[:, None] * stride_dot + offs_d[None, :],
                            mask=mask, other=0.0)
        delta_row = tl.sum(out_tile.to(tl.float32) * dout_tile.to(tl.float32), 1)
        tl.store(delta_ptr + head.to(tl.int64) * n_tokens + tok, delta_row, mask=offs_t < n_tokens)

    @triton.jit
    def _varlen_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, tile_doc_ptr, tile_end_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        n_tokens, n_docs, n_kv_heads, group, softmax_scale, scale_log2, softcap_log2, window,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOWED: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    ):
        # the walk starts at the tile's first key (causal), a multiple of TILE: query blocks then tile it exactly
        tl.static_assert(TILE % BLOCK_M == 0, "the query block must divide the key tile")
        pid = tl.program_id(0)
        kv_head = pid % n_kv_heads
        # causal: the first key tiles of a document see the most queries, so natural order is heaviest first
        doc, start_n, seq_start, seq_len = _locate_tile(tile_doc_ptr, tile_end_ptr, cu_ptr, pid // n_kv_heads,
                                                        n_docs, TILE, False)
        if doc >= n_docs:
            return
        offs_n = start_n + tl.arange(0, TILE)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = offs_d < HEAD_DIM
        # the tile's rows from its first (int64 scalar) plus int32 offsets within it, loads and stores alike
        tile0 = (seq_start + start_n).to(tl.int64)
        local_n = tl.arange(0, TILE)[:, None]
        kv_mask = (offs_n < seq_len)[:, None]
        if HEAD_DIM != HEAD_DIM_PAD:  # padded head dims only: a mask of the full columns costs registers
            kv_mask = kv_mask & d_ok[None, :]
        k_tile = tl.load(k_ptr + kv_head * stride_kh + tile0 * stride_kt + (local_n * stride_kt + offs_d[None, :]),
                         mask=kv_mask, other=0.0)
        v_tile = tl.load(v_ptr + kv_head * stride_vh + tile0 * stride_vt + (local_n * stride_vt + offs_d[None, :]),
                         mask=kv_mask, other=0.0)
        dk_acc = tl.zeros([TILE, HEAD_DIM_PAD], dtype=tl.float32)
        dv_acc = tl.zeros([TILE, HEAD_DIM_PAD], dtype=tl.float32)

        # causal: queries above the tile's first key see none of its keys; with a window, query i sees key j while
        # i < j + window, so the tile's last key leaves every query's window at start_n + TILE - 1 + window
        lo = 0
        hi = seq_len
        if CAUSAL:
            lo = start_n
            if WINDOWED:
                hi = tl.minimum(seq_len, start_n + TILE - 1 + window)
        seq_start64 = seq_start.to(tl.int64)
        local = tl.arange(0, BLOCK_M)
        n_blocks = tl.cdiv(hi - lo, BLOCK_M)
        # One flat loop over (query head of the GQA group, query block): this key/value head's gradients sum over
        # its group's heads in registers. Every block is masked, and there is one copy of the body: the registers
        # of a 128-key tile's two [128, D] float32 accumulators leave no room for a second one, nor for a nested
        # loop. A block is addressed from its first row (int64 scalar math) plus int32 offsets within it.
        for step in range(group * n_blocks):
            g = step // n_blocks
            start_m = lo + (step - g * n_blocks) * BLOCK_M
            head = kv_head * group + g
            row0 = seq_start64 + start_m
            offs_m = start_m + local
            row_ok = offs_m < seq_len
            tile_mask = row_ok[:, None]
            if HEAD_DIM != HEAD_DIM_PAD:
                tile_mask = tile_mask & d_ok[None, :]
            stats = head.to(tl.int64) * n_tokens + row0
            # rows past the document get lse = +inf, so their P is exactly 0 without a [keys, queries] mask of them
            lse_row = tl.load(lse_ptr + stats + local, mask=row_ok, other=float("inf"))
            delta_row = tl.load(delta_ptr + stats + local, mask=row_ok, other=0.0)
            q_tile = tl.load(q_ptr + head * stride_qh + row0 * stride_qt
                             + (local[:, None] * stride_qt + offs_d[None, :]), mask=tile_mask, other=0.0)
            dout_tile = tl.load(dout_ptr + head * stride_doh + row0 * stride_dot
                                + (local[:, None] * stride_dot + offs_d[None, :]), mask=tile_mask, other=0.0)
            # transposed scores [keys, queries]: the key tile stays the row operand of every dot. Its scale is
            # applied here (one FFMA with the lse), not to the tile: a scaled k would be a register operand of
            # the dot for the whole loop, the raw one is read from shared memory
            scores_t, capped_t = _scores(tl.dot(k_tile, tl.trans(q_tile)) * scale_log2, softcap_log2, SOFTCAP)
            # dP before P: the scores die as P is made, so at most two [keys, queries] float32 blocks are live
            dp_t = tl.dot(v_tile, tl.trans(dout_tile)) - delta_row[None, :]
            p_t = tl.math.exp2(scores_t - lse_row[None, :])
            if CAUSAL:
                p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], True, window, CAUSAL, WINDOWED), p_t, 0.0)
            ds_t = p_t * dp_t
            if SOFTCAP:
                ds_t = ds_t * (1.0 - capped_t * capped_t)
            dv_acc = tl.dot(p_t.to(dout_tile.dtype), dout_tile, dv_acc)
            dk_acc = tl.dot(ds_t.to(q_tile.dtype), q_tile, dk_acc)

        tl.store(dv_ptr + kv_head * stride_dvh + tile0 * stride_dvt + (local_n * stride_dvt + offs_d[None, :]),
                 dv_acc.to(dv_ptr.dtype.element_ty), mask=kv_mask)
        dk_acc = dk_acc * softmax_scale
        tl.store(dk_ptr + kv_head * stride_dkh + tile0 * stride_dkt + (local_n * stride_dkt + offs_d[None, :]),
                 dk_acc.to(dk_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _dq_inner(dq_acc, q_tile, dout_tile, lse_row, delta_row, k_base, v_base, stride_kt, stride_vt,
                  seq_start, seq_len, offs_m, lo, hi, softcap_log2, window,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tok_n = (seq_start + offs_n).to(tl.int64)
            if MASKED:
                col_ok = offs_n < seq_len
                t_mask = col_ok[None, :] & d_ok[:, None]
            else:
                t_mask = d_ok[:, None]
            kT_tile = tl.load(k_base + tok_n[None, :] * stride_kt + offs_d[:, None], mask=t_mask, other=0.0)
            vT_tile = tl.load(v_base + tok_n[None, :] * stride_vt + offs_d[:, None], mask=t_mask, other=0.0)
            scores, capped = _scores(tl.dot(q_tile, kT_tile), softcap_log2, SOFTCAP)
            p = tl.math.exp2(scores - lse_row[:, None])
            if MASKED:
                keep = _visible(offs_m[:, None], offs_n[None, :], col_ok[None, :], window, CAUSAL, WINDOWED)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(dout_tile, vT_tile)
            ds = p * (dp - delta_row[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - capped * capped)
            dq_acc = tl.dot(ds.to(kT_tile.dtype), tl.trans(kT_tile), dq_acc)
        return dq_acc

    @triton.jit
    def _varlen_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, tile_doc_ptr, tile_end_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        n_tokens, n_docs, n_heads, group, softmax_scale, scale_log2, softcap_log2, window,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOWED: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    ):
        # as in the forward: the unmasked pass must end exactly at the tile's first row
        tl.static_assert(TILE % BLOCK_N == 0, "the key block must divide the query tile")
        pid = tl.program_id(0)
        head = pid % n_heads
        doc, start_m, seq_start, seq_len = _locate_tile(tile_doc_ptr, tile_end_ptr, cu_ptr, pid // n_heads,
                                                        n_docs, TILE, CAUSAL)
        if doc >= n_docs:
            return
        kv_head = head // group
        offs_m = start_m + tl.arange(0, TILE)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        row_ok = offs_m < seq_len
        d_ok = offs_d < HEAD_DIM
        tile_mask = row_ok[:, None] & d_ok[None, :]
        tok_m = (seq_start + offs_m).to(tl.int64)
        q_tile = tl.load(q_ptr + head * stride_qh + tok_m[:, None] * stride_qt + offs_d[None, :],
                         mask=tile_mask, other=0.0)
        q_tile = (q_tile.to(tl.float32) * scale_log2).to(q_tile.dtype)  # once: q.k in base-2 units
        dout_tile = tl.load(dout_ptr + head * stride_doh + tok_m[:, None] * stride_dot + offs_d[None, :],
                            mask=tile_mask, other=0.0)
        row_offsets = head.to(tl.int64) * n_tokens + tok_m
        lse_row = tl.load(lse_ptr + row_offsets, mask=row_ok, other=0.0)
        delta_row = tl.load(delta_ptr + row_offsets, mask=row_ok, other=0.0)
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        dq_acc = tl.zeros([TILE, HEAD_DIM_PAD], dtype=tl.float32)
        if CAUSAL:
            # the forward's key blocks: skipped before the window, masked across its edge, unmasked, diagonal
            full_lo = 0
            if WINDOWED:
                lo, full_lo = _window_key_range(start_m, window, TILE, BLOCK_N)
                dq_acc = _dq_inner(dq_acc, q_tile, dout_tile, lse_row, delta_row, k_base, v_base, stride_kt,
                                   stride_vt, seq_start, seq_len, offs_m, lo, full_lo, softcap_log2,
                                   window, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, True)
            dq_acc = _dq_inner(dq_acc, q_tile, dout_tile, lse_row, delta_row, k_base, v_base, stride_kt,
                               stride_vt, seq_start, seq_len, offs_m, full_lo, start_m, softcap_log2,
                               window, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, False)
            diag_hi = tl.minimum(start_m + TILE, seq_len)
            dq_acc = _dq_inner(dq_acc, q_tile, dout_tile, lse_row, delta_row, k_base, v_base, stride_kt,
                               stride_vt, seq_start, seq_len, offs_m, start_m, diag_hi, softcap_log2,
                               window, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, True)
        else:
            full_hi = (seq_len // BLOCK_N) * BLOCK_N
            dq_acc = _dq_inner(dq_acc, q_tile, dout_tile, lse_row, delta_row, k_base, v_base, stride_kt,
                               stride_vt, seq_start, seq_len, offs_m, 0, full_hi, softcap_log2,
                               window, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, False)
            dq_acc = _dq_inner(dq_acc, q_tile, dout_tile, lse_row, delta_row, k_base, v_base, stride_kt,
                               stride_vt, seq_start, seq_len, offs_m, full_hi, seq_len, softcap_log2,
                               window, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, True)
        dq_acc = dq_acc * softmax_scale
        tl.store(dq_ptr + head * stride_dqh + tok_m[:, None] * stride_dqt + offs_d[None, :],
                 dq_acc.to(dq_ptr.dtype.element_ty), mask=tile_mask)

    # Autotune lists (BLOCK, num_warps, num_stages) per architecture and head-dim class: <= 64, 128 (80, 96 pad
    # to it), 256. Every config of every list compiles without spilling at the headline shapes (python -m
    # lorafuse.kernels.aot --report; tests/kernels/test_static_gate.py; the 64 class at Llama-3.2-1B's, where on
    # sm_80 the forward's 4-warp configs spill 64-72 B and dQ's 64-key blocks 108-172 B, so they are left out).
    # The tile sizes are fixed per class on the host (the tile list depends on them); the autotuner picks the
    # inner block, warps and stages, keyed by head dim, causal, window, softcap, GQA group (dk/dv) and the
    # tensors' dtypes (added by the autotuner).
    def _configs(param, options):
        return [triton.Config({param: block}, num_warps=warps, num_stages=stages)
                for block, warps, stages in options]

    _FWD_OPTIONS = {
        80: {64: [(64, 8, 3), (128, 8, 3)],
             128: [(32, 4, 3), (32, 4, 2), (64, 8, 3), (32, 8, 3)],
             256: [(32, 8, 2)]},
        90: {64: [(64, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4)],
             128: [(64, 8, 3), (128, 8, 3), (128, 8, 2), (64, 8, 4)],
             256: [(32, 8, 2), (32, 8, 3)]},
    }
    # dK/dV at D = 128 on sm_90: a 128-key tile on 8 warps (one 64-key half per warpgroup). With 32-query blocks
    # the score and dP dots are wgmma m64n32 (a 64-key tile made them m64n16), pipelined over 2 or 3 stages; with
    # 64-query blocks they are m64n64, which fits the registers (254) only unpipelined, num_stages=1 (2 stages
    # spill 152 B, 3 stages 72 B). The autotuner picks among the three on the GPU. At D = 256 (Gemma 2), a
    # 32-key tile with 32-query blocks (16-query blocks spill 16-32 B at the 128 registers ptxas gives them).
    _DKDV_OPTIONS = {
        80: {64: [(32, 8, 2), (32, 8, 3), (64, 8, 2)],
             128: [(32, 8, 2), (32, 8, 3)],
             256: [(16, 8, 3), (16, 8, 2)]},
        90: {64: [(32, 8, 2), (32, 8, 3), (64, 8, 2)],
             128: [(32, 8, 2), (32, 8, 3), (64, 8, 1)],
             256: [(32, 8, 2)]},
    }
    _DQ_OPTIONS = {
        80: {64: [(32, 8, 2), (32, 8, 3)],
             128: [(32, 4, 2), (32, 4, 3), (32, 8, 2), (64, 8, 2)],
             256: [(32, 8, 2), (16, 8, 2)]},
        90: {64: [(32, 8, 2), (64, 8, 2), (32, 8, 3), (64, 8, 3)],
             128: [(32, 8, 2), (32, 8, 3), (64, 8, 2), (64, 8, 3)],
             256: [(16, 8, 2), (16, 8, 3), (32, 8, 3)]},
    }
    _KEY = ["HEAD_DIM", "CAUSAL", "WINDOWED", "SOFTCAP"]

    def _tuned(kernel, param, options, key):
        return {dim: arch_autotune({arch: _configs(param, options[arch][dim]) for arch in options}, key=key)(kernel)
                for dim in options[90]}

    _TUNED_FWD = _tuned(_varlen_fwd_kernel, "BLOCK_N", _FWD_OPTIONS, _KEY)
    _TUNED_DKDV = _tuned(_varlen_bwd_dkdv_kernel, "BLOCK_M", _DKDV_OPTIONS, [*_KEY, "group"])
    _TUNED_DQ = _tuned(_varlen_bwd_dq_kernel, "BLOCK_N", _DQ_OPTIONS, _KEY)

# Rows per tile, per architecture and head-dim class: (query tile of the forward and dq, key tile of dK/dV).
# dK/dV keeps two [tile, D] float32 accumulators in registers, hence its smaller tile at head dim 256. On
# sm_80 a 128-row query tile at D = 128 spills in every dQ config and the forward's 128-key blocks (mma.sync
# keeps both operands in registers); 64 rows do not.
TILES = {80: {64: (128, 128), 128: (64, 64), 256: (64, 32)},
         90: {64: (128, 128), 128: (128, 128), 256: (64, 32)}}
# The interpreter runs one small fixed config: query tiles of 32 and key tiles of 64 with inner blocks of
# 16 still give several tiles per document, several diagonal blocks per tile, the unmasked loops, and
# two different tile lists.
INTERP_TILES, INTERP_BLOCK = (32, 64), 16
PREPROCESS_BLOCK_T = 64


def _head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dim_class(head_dim_pad: int) -> int:
    return 64 if head_dim_pad <= 64 else head_dim_pad


def _tiles(head_dim_pad: int) -> tuple[int, int]:
    return INTERP_TILES if INTERPRETED else TILES[device_arch() or 90][_dim_class(head_dim_pad)]


def _tile_schedule(cu_seqlens: torch.Tensor, n_tokens: int, tile: int):
    """Map program -> document on the device: tile_doc [cdiv(T, tile) + B] int32 (B past the real
    tiles) and tile_end [B] int32, the cumulative number of tiles through each document."""
    n_docs = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tiles_per_doc = torch.div(lengths + (tile - 1), tile, rounding_mode="floor")
    tile_end = torch.cumsum(tiles_per_doc, 0, dtype=torch.int32)
    bound = triton.cdiv(n_tokens, tile) + n_docs
    programs = torch.arange(bound, dtype=torch.int32, device=cu_seqlens.device)
    tile_doc = torch.searchsorted(tile_end, programs, right=True, out_int32=True)
    return tile_doc, tile_end, bound


def _schedule(cu_seqlens: torch.Tensor, n_tokens: int, tile: int):
    """_tile_schedule, built once per cu_seqlens tensor and tile size: every layer of a micro-batch reads the same
    cu_seqlens, so its forward and backward reuse the tile lists the first layer built (5 ops per list and call
    otherwise). Kept on the tensor itself, so it lives as long as the batch; an in-place change of cu_seqlens
    (its version counter) builds it again."""
    cache = getattr(cu_seqlens, "_lorafuse_tiles", None)
    if cache is None or cache[0] != cu_seqlens._version:
        cache = (cu_seqlens._version, {})
        cu_seqlens._lorafuse_tiles = cache
    key = (n_tokens, tile)
    if key not in cache[1]:
        cache[1][key] = _tile_schedule(cu_seqlens, n_tokens, tile)
    return cache[1][key]


def _head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


LOG2E = math.log2(math.e)


class _Scores(NamedTuple):
    """What the kernels compute for each (query, key) pair (module docstring): the mask and the scores."""

    causal: bool
    softmax_scale: float
    window: int | None  # None: no window (a window of at least T tokens is none)
    softcap: float | None

    def args(self) -> tuple:
        """The kernels' (softcap_log2, window) arguments; placeholders where a feature is off."""
        softcap_log2 = self.softcap * LOG2E if self.softcap is not None else 1.0
        return self.softmax_scale * LOG2E, softcap_log2, self.window or 0

    def meta(self) -> dict:
        return dict(CAUSAL=self.causal, WINDOWED=self.window is not None, SOFTCAP=self.softcap is not None)


def _varlen_forward(q, k, v, cu_seqlens, scores: _Scores, q_schedule):
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    head_dim_pad = _head_dim_pad(head_dim)
    tile_doc, tile_end, bound = q_schedule
    out = empty_output((n_tokens, n_heads, head_dim), q.dtype, q.device)
    lse = empty_output((n_heads, n_tokens), torch.float32, q.device)
    if n_tokens == 0:  # CUDA rejects empty grids
        return out, lse
    args = (q, k, v, out, lse, cu_seqlens, tile_doc, tile_end,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            n_tokens, cu_seqlens.numel() - 1, n_heads, group, *scores.args())
    grid = (bound * n_heads,)
    meta = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, TILE=_tiles(head_dim_pad)[0], **scores.meta())
    launch(_varlen_fwd_kernel, _TUNED_FWD[_dim_class(head_dim_pad)], grid, *args,
           interpreted={"BLOCK_N": INTERP_BLOCK}, **meta)
    return out, lse


def _varlen_backward(dout, q, k, v, out, lse, cu_seqlens, scores: _Scores, q_schedule):
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    head_dim_pad = _head_dim_pad(head_dim)
    tile_q, tile_kv = _tiles(head_dim_pad)
    kv_schedule = q_schedule if tile_kv == tile_q else _schedule(cu_seqlens, n_tokens, tile_kv)
    n_docs = cu_seqlens.numel() - 1

    if n_tokens == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = empty_output((n_heads, n_tokens), torch.float32, q.device)
    _varlen_bwd_preprocess_kernel[(triton.cdiv(n_tokens, PREPROCESS_BLOCK_T), n_heads)](
        out, dout, delta, n_tokens, n_heads, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_T=PREPROCESS_BLOCK_T)

    dq = empty_output((n_tokens, n_heads, head_dim), q.dtype, q.device)
    dk = empty_output((n_tokens, n_kv_heads, head_dim), k.dtype, k.device)
    dv = empty_output((n_tokens, n_kv_heads, head_dim), v.dtype, v.device)
    meta = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, **scores.meta())
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens, kv_schedule[0], kv_schedule[1],
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 n_tokens, n_docs, n_kv_heads, group, scores.softmax_scale, *scores.args())
    dq_args = (q, k, v, dout, lse, delta, dq, cu_seqlens, q_schedule[0], q_schedule[1],
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
               n_tokens, n_docs, n_heads, group, scores.softmax_scale, *scores.args())
    dkdv_grid, dq_grid = (kv_schedule[2] * n_kv_heads,), (q_schedule[2] * n_heads,)
    dim_class = _dim_class(head_dim_pad)
    launch(_varlen_bwd_dkdv_kernel, _TUNED_DKDV[dim_class], dkdv_grid, *dkdv_args,
           interpreted={"BLOCK_M": INTERP_BLOCK}, **meta, TILE=tile_kv)
    launch(_varlen_bwd_dq_kernel, _TUNED_DQ[dim_class], dq_grid, *dq_args,
           interpreted={"BLOCK_N": INTERP_BLOCK}, **meta, TILE=tile_q)
    return dq, dk, dv


class KVAgain(NamedTuple):
    """How to compute k and v again in backward instead of keeping them: fn(*inputs) -> (k, v), the values given
    to the forward (any token and head strides, head dim contiguous). The inputs are saved for backward in their
    place, like every saved tensor (saved-tensor hooks, offload included, see them); fn runs once, without
    autograd, when the backward starts."""

    fn: object
    inputs: tuple


class VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scores: _Scores, again: KVAgain | None):
        q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
        schedule = _schedule(cu_seqlens, q.shape[0], _tiles(_head_dim_pad(q.shape[2]))[0])
        out, lse = _varlen_forward(q, k, v, cu_seqlens, scores, schedule)
        kept = (k, v) if again is None else again.inputs
        ctx.save_for_backward(q, out, lse, cu_seqlens, schedule[0], schedule[1], *kept)
        ctx.again = None if again is None else (again.fn, k.shape, v.shape, k.dtype)
        ctx.bound = schedule[2]
        ctx.scores = scores
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, cu_seqlens, tile_doc, tile_end, *kept = ctx.saved_tensors
        if ctx.again is None:
            k, v = kept
        else:
            fn, k_shape, v_shape, dtype = ctx.again
            with torch.no_grad():
                k, v = fn(*kept)
            if k.shape != k_shape or v.shape != v_shape or k.dtype != dtype or v.dtype != dtype:
                raise RuntimeError(f"varlen_attention: kv_again gave k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} "
                                   f"{v.dtype}; the forward had {tuple(k_shape)}, {tuple(v_shape)} {dtype}")
            k, v = _head_dim_contiguous(k), _head_dim_contiguous(v)
        dout = _head_dim_contiguous(dout)
        dq, dk, dv = _varlen_backward(dout, q, k, v, out, lse, cu_seqlens, ctx.scores,
                                      (tile_doc, tile_end, ctx.bound))
        return dq, dk, dv, None, None, None


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, softmax_scale=None, *,
                     deterministic: bool = False, window: int | None = None, softcap: float | None = None,
                     kv_again: KVAgain | None = None):
    """Attention within each packed document; see the module docstring. Returns [T, Hq, D].

    q, k, v may be strided views (head dim contiguous), e.g. split from one fused qkv output.
    deterministic=True guarantees bitwise-reproducible outputs and gradients; every path of this
    implementation already is (the backward uses no atomics), so the flag only states the contract.
    window (causal only): query i attends key j of its document when i - window < j <= i (flash-attn's
    window_size=(window - 1, 0); 1 is the diagonal alone; None, or a window longer than the document, is
    plain causal). softcap: scores s = scale q.k become softcap * tanh(s / softcap) before the softmax
    (Gemma 2's attn_logit_softcapping); None leaves them as they are. kv_again (KVAgain): k and v are not kept
    for backward but computed again there from its inputs (memory for a recompute: the engine's k and v come from
    the layer's input by a GEMM and RoPE); the PyTorch path keeps what autograd keeps.
    """
    check_varlen_args(q, k, v, cu_seqlens, max_seqlen)
    check_window_softcap(causal, window, softcap)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if not use_triton(q):
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window=window,
                                          softcap=softcap)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError("q, k, v and cu_seqlens must be on the same device")
    count("varlen_attention")
    # no document is longer than T tokens: a window of T or more masks nothing that causal does not
    window = int(window) if window is not None and window < q.shape[0] else None
    softcap = float(softcap) if softcap is not None else None
    scores = _Scores(bool(causal), float(softmax_scale), window, softcap)
    if kv_again is not None and not (callable(kv_again.fn) and all(isinstance(t, torch.Tensor)
                                                                   for t in kv_again.inputs)):
        raise TypeError("varlen_attention: kv_again must be KVAgain(fn, inputs) with a callable fn and tensor inputs")
    return VarlenAttention.apply(q, k, v, cu_seqlens.contiguous(), scores, kv_again)


# Arguments not listed here are bf16 tensors (*_ptr) or i32 strides and counts.
_AOT_TYPES = {"lse_ptr delta_ptr": "*fp32", "cu_ptr tile_doc_ptr tile_end_ptr": "*i32",
              "scale_log2 softmax_scale softcap_log2": "fp32"}

# bf16 variants the GPU runs that the static gate (aot.py --gate, which compiles every config of Llama-3.1-8B's,
# a Gemma-2 local layer's and head dim 64's launches as they are specialised) does not: head dim 80 (padded
# to 128: the preprocess), plain causal at 256, windows at 128 (Mistral, Gemma 3 local layers), and softcapping
# without a window (Gemma 2's global layers). The first config of each autotune list, compiled without the
# runtime's divisibility-by-16 specialization of pointers and strides.
AOT_SPECS = [
    aot_spec(_varlen_fwd_kernel, "bf16", dict(HEAD_DIM=256, HEAD_DIM_PAD=256, TILE=TILES[90][256][0], CAUSAL=True),
             types=_AOT_TYPES, config=_TUNED_FWD[256].arch_configs[90][0]),
    aot_spec(_varlen_bwd_preprocess_kernel, "bf16", dict(HEAD_DIM=80, HEAD_DIM_PAD=128, BLOCK_T=PREPROCESS_BLOCK_T),
             types=_AOT_TYPES),
    aot_spec(_varlen_bwd_dkdv_kernel, "bf16", dict(HEAD_DIM=256, HEAD_DIM_PAD=256, TILE=TILES[90][256][1], CAUSAL=True),
             types=_AOT_TYPES, config=_TUNED_DKDV[256].arch_configs[90][0]),
    *[aot_spec(kernel, "bf16", dict(HEAD_DIM=128, HEAD_DIM_PAD=128, TILE=TILES[90][128][tile], CAUSAL=True,
                                    WINDOWED=True),
               types=_AOT_TYPES, config=tuned[128].arch_configs[90][0])
      for kernel, tuned, tile in ((_varlen_fwd_kernel, _TUNED_FWD, 0), (_varlen_bwd_dkdv_kernel, _TUNED_DKDV, 1),
                                  (_varlen_bwd_dq_kernel, _TUNED_DQ, 0))],
    aot_spec(_varlen_fwd_kernel, "bf16", dict(HEAD_DIM=256, HEAD_DIM_PAD=256, TILE=TILES[90][256][0], CAUSAL=True,
                                              SOFTCAP=True), types=_AOT_TYPES,
             config=_TUNED_FWD[256].arch_configs[90][0]),
] if HAVE_TRITON else []

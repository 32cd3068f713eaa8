"""LoRA linear: y = x W^T + bias + s * (x A^T) B^T; grouped projections of one input; the LoRA MLP.

Shapes (PEFT layout): x [..., in]; weight W [out, in] (frozen base); lora_a A [r, in];
lora_b B [out, r]; bias [out] or None; s = scaling (alpha / r, or alpha / sqrt(r) for rsLoRA).

Gradients, with dY [..., out] and the intermediate U = x A^T [..., r]:
  dX = dY W + s (dY B) A
  dA = s (dY B)^T x        dB = s dY^T U
  dW = dY^T x (only when W requires grad)   dbias = sum dY (only when bias requires grad)

Grouped projections (q/k/v, gate/up): the frozen weights are stacked, W = [W_0; W_1; ...]
[sum n_i, in]; the adapters are stacked as A = [A_0; A_1; ...] [R = sum r_i, in] and a
block-diagonal B [sum n_i, R] whose block i is B_i, and s becomes a per-rank-column vector. Then the
whole group is one LoRA linear: y_all = x W^T + bias + (x A^T diag(s)) B^T, with y_i the column
block i of y_all (a view of one buffer, last dim contiguous). A projection without adapter has
r_i = 0. The backward takes the dY_i as separate segments of the reduction (no concatenation).
The block-diagonal B is not materialised when every projection of the group (at most three) has an
adapter of one rank r: the kernels read B_rows = [B_0; B_1; ...] [sum n_i, r] with a per-feature rank map
(feature n of projection i holds columns r_off_i .. r_off_i + r of U: _gemm.rank_window). The A_i (B_i)
are read as one matrix in place when they are adjacent rows of one buffer, as inject_lora leaves a
layer's; otherwise they are stacked by one copy per call.

The LoRA MLP: y = down(act(gate(x)) * up(x)), gate/up one group over [W_gate; W_up], each
projection a LoRA linear (or plain, without adapter); act is silu (SwiGLU, the default) or
gelu_tanh (GeGLU, Gemma), see swiglu.py. h = act(g) * u is not kept for backward: the GEMM that
computes dH = dY W_down + s (dY B_d) A_d applies the gated activation's backward in its epilogue,
writing dG = dH u act'(g) and dU = dH act(g) (never dH) and recomputing h there for dA_down = V_d^T h.

Every GEMM with a [tokens, features] output is one Triton kernel (`_lowrank_mm_kernel`):
  C[M, N] = scale[n] * (sum_seg A_seg[M, K_seg] @ Bop[off_seg : off_seg + K_seg, N] + E[M, R] @ F[R, N])
            + bias[n]                         (then optionally the SwiGLU/GeGLU backward on C)
with every operand addressed through strides, so W, W^T, A^T, B^T are read in place, the adapters in their
own dtype (the float32 masters), rounded to the activations' dtype tile by tile: what a cast before the call
would give, without its launch:
  forward      U = x A^T diag(s)          skinny: N = R, one column block (x read once)
               y = x W^T + bias + U B^T    E = U, F = B^T
  backward     V = dY B diag(s)           skinny, the dY_i as segments
               dX = dY W + V A             E = V, F = A, the dY_i as segments
               dA = V^T x, dB_i = dY_i^T U_i: one GEMM each with a float32 output (the masters' dtype, no
               cast after): torch.mm(out_dtype=float32) on CUDA, this kernel on the CPU; dW = dY^T x by cuBLAS.
               A group whose dY_i are the column blocks of one buffer (the engine's q/k/v after RoPE's backward,
               gate/up always) and whose ranks sit in a rank map gets all its dB_i from one launch of this
               kernel: C = dY^T U [sum n_i, R] with the rank map on the output (MAP_OUTPUT), row m storing only
               its own projection's r columns, so C is the dB_i stacked by rows
Saved for backward: x and U only (plus the parameters). U carries the scale, so dB needs none.
Not handled here: LoRA dropout > 0 (the low-rank branch then sees another input than the base);
the engine runs plain PyTorch ops for that case and these kernels for dropout 0.

A frozen weight may be an nf4.NF4Weight (QLoRA): it is dequantized (nf4.py's kernel) into a dense buffer
right before the GEMM that reads it, in forward and again in backward, and only the NF4 weight is kept for
backward; the buffer is freed after its GEMM (one dense weight at a time), so the caching allocator hands
the same memory to the next one. With LORAFUSE_NF4_GEMM=fused, x W^T and dY W read the NF4 weight in their
tiles instead (nf4.nf4_matmul), no dense copy at all; the MLP's dH GEMM (GLU epilogue) always dequantizes.

Tiling of the kernel: output tiles [BLOCK_M, BLOCK_N] in grouped (GROUP_M) order for L2 reuse of
the x row block; the low-rank product E F is accumulated first (before the main loop, so its
loads overlap the pipeline's prologue instead of trailing it), then the main loop over K in
BLOCK_K steps, segment after segment; float32 accumulation, cast on store. Rows and columns of
the operand loads wrap (modulo M, N) so only the K tail is masked (not at all when every K_seg
is a multiple of BLOCK_K); stores are masked. Row offsets are int64. The skinny GEMMs use one
column block of next_pow2(R) >= 16 columns (tl.dot needs 16; the padding is masked), so r = 1
works and x is streamed once. Block sizes are autotuned per (bucketed tokens, N, K, R) on GPU;
the interpreter runs one small fixed config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, use_triton
from ._launch import aot_spec, arch_autotune, count, device_arch, dot_precision, empty_output, launch
from ._lora_gemm_select import lora_gemm_path
from .nf4 import dense_weight, gemm_mode, is_nf4, nf4_linear_reference, nf4_matmul
from .rms_norm import NormedInput
from .swiglu import GLU_REFERENCES, check_activation, glu_forward_triton

# ----------------------------------------------------------------------------- PyTorch references


def _base_reference(x, weight, bias=None):
    """x W^T + bias; an NF4 weight is dequantized per call (and in backward), never kept dense."""
    return nf4_linear_reference(x, weight, bias) if is_nf4(weight) else F.linear(x, weight, bias)


def lora_linear_reference(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """Plain PyTorch: the definition above, differentiated by autograd (lora_a None: the frozen linear). The
    scaling multiplies B ([out, r]), not the product ([tokens, out]): the same math, one pass less over the output."""
    base = _base_reference(x, weight, bias)
    return base if lora_a is None else base + F.linear(F.linear(x, lora_a), lora_b * scaling)


def lora_linear_group_reference(x, weight, lora_as, lora_bs, scalings, out_splits, bias=None, *, normed_from=None):
    """y_i = x W_i^T + bias_i + s_i (x A_i^T) B_i^T, the frozen part as one product with the stacked weight
    (x read once, an NF4 weight dequantized once; backward's dx is one product too). normed_from is accepted
    for the Triton path's signature and not used: autograd keeps what it keeps."""
    frozen = _base_reference(x, weight, bias).split(list(out_splits), -1)
    return tuple(y if a is None else y + F.linear(F.linear(x, a), b * s)
                 for y, a, b, s in zip(frozen, lora_as, lora_bs, scalings, strict=True))


def lora_mlp_reference(x, gate_up_weight, gate_a, gate_b, gate_scaling, up_a, up_b, up_scaling,
                       down_weight, down_a, down_b, down_scaling, activation: str = "silu", *, normed_from=None,
                       residual=None):
    inter = down_weight.shape[1]
    gate, up = lora_linear_group_reference(x, gate_up_weight, [gate_a, up_a], [gate_b, up_b],
                                           [gate_scaling, up_scaling], [inter, inter])
    h = GLU_REFERENCES[check_activation(activation)](gate, up)
    out = lora_linear_reference(h, down_weight, down_a, down_b, down_scaling)
    return out if residual is None else residual + out


# ----------------------------------------------------------------------------- Triton kernels

MAX_SEGMENTS = 3  # dY pieces one launch reads in place (q, k, v); more are concatenated first

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._gemm import grouped_pid, grouped_tile, lowrank_tile, rank_window
    from .swiglu import _activation_and_grad

    @triton.jit
    def _accumulate_segment(acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, b_off, K, rows_a, cols_b, stride_bn,
                            c1, c2, ro0, ro1, ro2, rw0, rw1, rw2,
                            EVEN_K: tl.constexpr, RANK_MAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        """acc += A[rows_a, 0:K] @ Bop[b_off : b_off + K, cols_b]. Bop tiles are rounded to A's dtype (a float32
        LoRA matrix read in place). RANK_MAP: Bop is block-diagonal, given as its blocks stacked by rows
        (B_rows [features, r]; cols_b are ranks): row k holds the ranks rank_window(k) (_gemm.py)."""
        b_cols = cols_b * stride_bn
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + (b_off + offs_k).to(tl.int64)[:, None] * stride_bk + b_cols[None, :]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if RANK_MAP:
                feature = b_off + k * BLOCK_K + offs_k
                lo, n = rank_window(feature, c1, c2, ro0, ro1, ro2, rw0, rw1, rw2)
                local = cols_b[None, :] - lo[:, None]
                b_ok = (local >= 0) & (local < n[:, None]) & (offs_k[:, None] < K - k * BLOCK_K)
                a_tile = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
                b_tile = tl.load(b_ptr + feature.to(tl.int64)[:, None] * stride_bk + local * stride_bn, mask=b_ok,
                                 other=0.0)
            elif EVEN_K:
                a_tile = tl.load(a_ptrs)
                b_tile = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a_tile = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b_tile = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a_tile, b_tile.to(a_tile.dtype), acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        return acc

    @triton.jit
    def _lowrank_mm_kernel(
        a0_ptr, a1_ptr, a2_ptr, b_ptr, c_ptr, bias_ptr, scale_ptr, e_ptr, f_ptr,
        g_ptr, u_ptr, du_ptr, h_ptr, res_ptr,
        M, N, R, K0, K1, K2, b_off0, b_off1, b_off2,
        map_c1, map_c2, map_ro0, map_ro1, map_ro2, map_rw0, map_rw1, map_rw2,
        stride_a0m, stride_a0k, stride_a1m, stride_a1k, stride_a2m, stride_a2k,
        stride_bk, stride_bn, stride_cm, stride_cn,
        stride_em, stride_er, stride_fr, stride_fn,
        stride_gm, stride_um, stride_dum, stride_hm, stride_resm,
        M_BUCKET,  # only an autotune key: tokens rounded up to a power of 2
        NUM_SEGS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LOWRANK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        GLU_BWD: tl.constexpr, ACTIVATION: tl.constexpr, STORE_H: tl.constexpr, EVEN_K: tl.constexpr,
        MAP_LOWRANK: tl.constexpr, MAP_SEGMENTS: tl.constexpr, MAP_OUTPUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # GROUP_M row blocks sweep the columns together (x rows stay in L2); loads wrap at M and N (rows_a, cols_b)
        offs_m, offs_n, rows_a, cols_b = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        # a group's block-diagonal B is read from its blocks stacked by rows (_gemm.py, rank_window): in the
        # forward's low-rank term (MAP_LOWRANK: F = B^T), in backward as the segments' Bop (MAP_SEGMENTS: dY B)
        if HAS_LOWRANK:
            if MAP_LOWRANK:
                rank_lo, rank_n = rank_window(cols_b, map_c1, map_c2, map_ro0, map_ro1, map_ro2, map_rw0, map_rw1,
                                              map_rw2)
            else:
                rank_lo, rank_n = 0, R
            acc = lowrank_tile(acc, e_ptr, stride_em, stride_er, f_ptr, stride_fr, stride_fn, rows_a, cols_b, R,
                               rank_lo, rank_n, BLOCK_R, DOT_PRECISION, MAP_LOWRANK)

        acc = _accumulate_segment(acc, a0_ptr, stride_a0m, stride_a0k, b_ptr, stride_bk, b_off0, K0, rows_a,
                                  cols_b, stride_bn, map_c1, map_c2, map_ro0, map_ro1, map_ro2, map_rw0, map_rw1,
                                  map_rw2, EVEN_K, MAP_SEGMENTS, DOT_PRECISION, BLOCK_K)
        if NUM_SEGS >= 2:
            acc = _accumulate_segment(acc, a1_ptr, stride_a1m, stride_a1k, b_ptr, stride_bk, b_off1, K1, rows_a,
                                      cols_b, stride_bn, map_c1, map_c2, map_ro0, map_ro1, map_ro2, map_rw0, map_rw1,
                                      map_rw2, EVEN_K, MAP_SEGMENTS, DOT_PRECISION, BLOCK_K)
        if NUM_SEGS >= 3:
            acc = _accumulate_segment(acc, a2_ptr, stride_a2m, stride_a2k, b_ptr, stride_bk, b_off2, K2, rows_a,
                                      cols_b, stride_bn, map_c1, map_c2, map_ro0, map_ro1, map_ro2, map_rw0, map_rw1,
                                      map_rw2, EVEN_K, MAP_SEGMENTS, DOT_PRECISION, BLOCK_K)

        col_ok = offs_n < N
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + offs_n, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]

        out_mask = (offs_m < M)[:, None] & col_ok[None, :]
        if GLU_BWD:
            # acc is dH of h = act(g) * u: store dG (at c) and dU, and h for dA of the down LoRA. The epilogue
            # is where this kernel runs out of registers (acc, g, u, three results, five pointer tiles): every
            # buffer is addressed from an int64 pointer to the tile's first row plus int32 tile-local offsets
            # (BLOCK_M rows of one stride fit in 32 bits), not a 64-bit address per element.
            pid_m, _ = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
            row0 = (pid_m * BLOCK_M).to(tl.int64)
            local_m = tl.arange(0, BLOCK_M)[:, None]
            cols = offs_n[None, :]
            g = tl.load(g_ptr + row0 * stride_gm + (local_m * stride_gm + cols), mask=out_mask,
                        other=0.0).to(tl.float32)
            # each result is stored as soon as it is computed, so at most acc, g, u and one result are live
            act, d_act = _activation_and_grad(g, ACTIVATION)
            tl.store(du_ptr + row0 * stride_dum + (local_m * stride_dum + cols),
                     (acc * act).to(du_ptr.dtype.element_ty), mask=out_mask)
            u = tl.load(u_ptr + row0 * stride_um + (local_m * stride_um + cols), mask=out_mask,
                        other=0.0).to(tl.float32)
            if STORE_H:
                tl.store(h_ptr + row0 * stride_hm + (local_m * stride_hm + cols),
                         (act * u).to(h_ptr.dtype.element_ty), mask=out_mask)
            tl.store(c_ptr + row0 * stride_cm + (local_m * stride_cm + cols * stride_cn),
                     (acc * u * d_act).to(c_ptr.dtype.element_ty), mask=out_mask)
        else:
            if HAS_RESIDUAL:  # the decoder's residual add, on the tile: one rounding, no launch after the GEMM
                res_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_resm + offs_n[None, :]
                acc = acc + tl.load(res_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            cols = offs_n[None, :]
            if MAP_OUTPUT:
                # dB of a group, C = dY^T U: row m (an output feature) keeps only its projection's ranks, stored
                # as that projection's dB block, so C holds the B_i stacked by rows [M, r] (rank_window)
                rank_lo, rank_n = rank_window(offs_m, map_c1, map_c2, map_ro0, map_ro1, map_ro2, map_rw0, map_rw1,
                                              map_rw2)
                cols = cols - rank_lo[:, None]
                out_mask = out_mask & (cols >= 0) & (cols < rank_n[:, None])
            c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + cols * stride_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)

    def _even_k(args) -> bool:
        return all(args[k] % args["BLOCK_K"] == 0 for k in ("K0", "K1", "K2"))

    _lowrank_mm = triton.heuristics({"EVEN_K": _even_k})(_lowrank_mm_kernel)

    _KEY = ["M_BUCKET", "N", "R", "K0", "K1", "K2", "NUM_SEGS", "HAS_LOWRANK", "GLU_BWD", "ACTIVATION"]

    def _main_config(bm, bn, bk, stages, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                             num_warps=warps)

    # Big GEMMs (x W^T, dY W): Hopper/Ampere-friendly tiles; float32 inputs only fit the smaller ones
    # (the autotuner drops configs that run out of shared memory).
    MAIN_CONFIGS = [
        _main_config(128, 256, 64, 3, 8),
        _main_config(256, 128, 64, 3, 8),
        _main_config(128, 128, 64, 4, 8),
        _main_config(128, 128, 64, 4, 4),
        _main_config(128, 64, 64, 4, 4),
        _main_config(64, 128, 64, 4, 4),
    ]

    def _skinny_config(bm, bk, stages, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": 1}, num_stages=stages, num_warps=warps)

    # Skinny GEMMs (x A^T, dY B): BLOCK_N is the padded rank, given per call; memory-bound on x / dY.
    SKINNY_CONFIGS = [
        _skinny_config(64, 128, 4, 4),
        _skinny_config(128, 64, 4, 4),
        _skinny_config(64, 64, 5, 4),
        _skinny_config(32, 128, 4, 4),
        # the one that always fits: float32 at 256 rank columns needs 290-580 KB of shared memory in the
        # configs above (sm_90 has 227), and with every config out of resources the autotuner fails
        _skinny_config(32, 32, 3, 4),
    ]

    # The dH GEMM with the GLU backward in its epilogue holds acc, g, u and act(g) per element at once: at 64
    # accumulator elements per thread (128 x 128 on 8 warps, 128 x 64 on 4) it spills on sm_80 and sm_90 however
    # the epilogue is ordered, so its tiles keep 32 per thread (BLOCK_M * BLOCK_N / (32 * warps)).
    GLU_CONFIGS = [
        _main_config(128, 64, 64, 4, 8),
        _main_config(64, 128, 64, 4, 8),
        _main_config(128, 64, 64, 3, 8),
        _main_config(64, 64, 64, 4, 4),
    ]

    # sm_80 keeps both dot operands of mma.sync in registers: 128 x 128 and 128 x 64 tiles on 4 warps spill there
    # (12-108 B per thread at the headline shapes), so its list leaves them out
    MAIN_CONFIGS_SM80 = [c for c in MAIN_CONFIGS if not (c.num_warps == 4 and c.kwargs["BLOCK_M"] == 128)]

    # Tiles that spill in one variant on one architecture at the headline shapes (python -m lorafuse.kernels.aot
    # --gate; bytes spilled per thread in the comments), left out of that variant's list there. The rank map
    # (MAP_LOWRANK: B read through per-column rank windows; MAP_SEGMENTS: V = dY B of q/k/v over three dY segments)
    # and dX's float32 A tiles (dX = dY W + V A, F = A read along its rows: stride_fn == 1) need more registers
    # than the plain GEMM. Main tiles are (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), skinny ones (BLOCK_M,
    # BLOCK_K, warps, stages).
    _SPILLING = {
        (80, "map_lowrank"): {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3)},  # 248-656 B, 176-320 B
        (90, "map_lowrank"): {(128, 256, 64, 8, 3), (128, 128, 64, 4, 4)},  # 64-104 B, 52-104 B
        # dX of one dY segment: o_proj / down (36 B), and q/k/v's (RoPE's backward hands one buffer) at 256 x 128
        (80, "dx"): {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3)},  # 36 B, 76 B
        (80, "dx3"): {(256, 128, 64, 8, 3)},  # q/k/v dX, three dY segments: 124 B
        (80, "map_segments"): {(128, 64, 4, 4)},  # 48 B
        (90, "map_segments"): {(32, 128, 4, 4)},  # 108 B
        (80, "residual"): {(256, 128, 64, 8, 3)},  # down_proj with the residual tile added: 144 B
    }

    def _variant(named_args, kwargs) -> str | None:
        if kwargs.get("HAS_RESIDUAL"):
            return "residual"
        if kwargs.get("MAP_LOWRANK"):
            return "map_lowrank"
        if kwargs.get("MAP_SEGMENTS"):
            return "map_segments"
        if kwargs.get("HAS_LOWRANK") and not kwargs.get("GLU_BWD") and named_args.get("stride_fn") == 1:
            return "dx3" if kwargs.get("NUM_SEGS") == 3 else "dx"
        return None

    def _tile(c) -> tuple:
        k = c.kwargs
        skinny = "BLOCK_N" not in k
        return ((k["BLOCK_M"], k["BLOCK_K"]) if skinny else (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"])) + \
            (c.num_warps, c.num_stages)

    def _prune_spilling(configs, named_args, **kwargs):
        """The architecture's list less the tiles that spill in this call's variant (_SPILLING); never empty."""
        spilling = _SPILLING.get((device_arch(), _variant(named_args, kwargs)), ())
        return [c for c in configs if _tile(c) not in spilling] or configs

    # the variant flags and F's layout are in the key: a forward and the dX of the same shape (o_proj) must not
    # share a tuned config that only one of them may take
    _TUNE_KEY = _KEY + ["MAP_LOWRANK", "MAP_SEGMENTS", "HAS_RESIDUAL", "stride_fn"]
    _tuned_main = arch_autotune({80: MAIN_CONFIGS_SM80, 90: MAIN_CONFIGS}, key=_TUNE_KEY,
                                prune=_prune_spilling)(_lowrank_mm)
    _tuned_glu = arch_autotune({80: GLU_CONFIGS, 90: GLU_CONFIGS}, key=_TUNE_KEY)(_lowrank_mm)
    _tuned_skinny = arch_autotune({80: SKINNY_CONFIGS, 90: SKINNY_CONFIGS}, key=_TUNE_KEY + ["BLOCK_N"],
                                  prune=_prune_spilling)(_lowrank_mm)

    # The interpreter is slow: one small config, and no tuning.
    INTERPRETER_MAIN = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
    INTERPRETER_SKINNY = {"BLOCK_M": 32, "BLOCK_K": 32, "GROUP_M": 1}

    def _aot_specs():
        """Variants of the autotune lists (tiles, warps, stages) for the kernel's main uses."""

        def spec(dtype, *, segs, lowrank, bias, scale, precision, config, block_n=None, block_r=16,
                 rank_map=False):
            # unit strides are constexpr 1 at runtime (Triton specialises them)
            consts = {"stride_a0k": 1, "stride_a1k": 1, "stride_a2k": 1, "stride_cn": 1,
                      "NUM_SEGS": segs, "HAS_BIAS": bias, "HAS_SCALE": scale, "HAS_LOWRANK": lowrank,
                      "HAS_RESIDUAL": False,
                      "GLU_BWD": False, "ACTIVATION": "silu", "STORE_H": False,
                      "EVEN_K": True, "DOT_PRECISION": precision, "BLOCK_R": block_r,
                      "MAP_LOWRANK": rank_map and lowrank, "MAP_SEGMENTS": rank_map and not lowrank,
                      "MAP_OUTPUT": False}
            if block_n is not None:
                consts["BLOCK_N"] = block_n
            # the LoRA matrices are the float32 masters, read in place: B (or A) as the low-rank F, and A (U = x A^T)
            # or B (V = dY B) as the skinny GEMMs' Bop
            types = {"scale_ptr": "*fp32", "f_ptr": "*fp32", **({"b_ptr": "*fp32"} if block_n is not None else {})}
            return aot_spec(_lowrank_mm_kernel, dtype, consts, types=types, config=config)

        big, tall, square8, _, _, small = MAIN_CONFIGS
        # only variants the static gate (aot.py --gate) does not compile as the engine launches them: the gate
        # already covers q/k/v's rank-map forward, the down projection's residual epilogue, both GLU epilogues
        # and the skinny U of q/k/v (every config, at the headline shapes, on sm_80 and sm_90)
        return [
            # forward y = x W^T + bias + U B^T: the largest tiles, bf16 and fp16
            spec("bf16", segs=1, lowrank=True, bias=True, scale=False, precision="tf32", config=big),
            spec("fp16", segs=1, lowrank=True, bias=False, scale=False, precision="tf32", config=tall, block_r=64),
            # V = dY B of q/k/v given as three separate dY (the engine hands one buffer): the rank map
            spec("bf16", segs=3, lowrank=False, bias=False, scale=True, precision="tf32", config=SKINNY_CONFIGS[0],
                 block_n=64, rank_map=True),
            # dX of q/k/v from three dY segments, rank chunks of 64
            spec("bf16", segs=3, lowrank=True, bias=False, scale=False, precision="tf32", config=square8,
                 block_r=64),
            # skinny U = x A^T diag(s), A the float32 master, at the widest rank block (3 x r = 192 -> 256 columns),
            # where float32 A tiles leave only the smallest config
            spec("bf16", segs=1, lowrank=False, bias=False, scale=True, precision="tf32", config=SKINNY_CONFIGS[-1],
                 block_n=256),
            # float32 (IEEE dots): only the smaller tiles fit in shared memory
            spec("fp32", segs=2, lowrank=True, bias=True, scale=False, precision="ieee", config=small),
            spec("fp32", segs=1, lowrank=False, bias=False, scale=True, precision="ieee", config=SKINNY_CONFIGS[-1],
                 block_n=256),
        ]

    AOT_SPECS = _aot_specs()


# ----------------------------------------------------------------------------- launching


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _mm(out, segments, b, b_strides, *, bias=None, scale=None, lowrank=None, glu=None, activation="silu",
        skinny=False, rank_map=None, residual=None, stacked_out=False):
    """out[M, N] = scale * (sum_s A_s @ Bop[off_s : off_s + K_s] + E @ F) + bias (+ residual [M, N], unit
    column stride)  (module docstring).

    segments: [(A_s [M, K_s], off_s)]; Bop is `b` read with b_strides = (stride along K, along N);
    lowrank: (E [M, R], F, (stride_fr, stride_fn)); glu: (g, u, du, h or None) for the dH epilogue of
    h = act(g) * u with act the `activation` ("silu", "gelu_tanh"). rank_map: (c1, c2, ro0, ro1, ro2, rw0, rw1, rw2)
    of a group's block-diagonal B given by rows (_Adapters): on the low-rank F when there is one, else on Bop;
    with stacked_out, on the output instead: the product [M, R] (R = Bop's columns) keeps row m's own ranks
    only, and out [M, r] receives them (a group's dB_i stacked by rows).
    out may be float32 with 16-bit operands (the LoRA gradients).
    """
    M, N = out.shape
    if stacked_out:
        N = b.shape[1]
    if M == 0 or N == 0:
        return out
    assert 1 <= len(segments) <= MAX_SEGMENTS
    segs = list(segments) + [segments[0]] * (MAX_SEGMENTS - len(segments))
    ks = [s[0].shape[1] if i < len(segments) else 0 for i, s in enumerate(segs)]
    if lowrank is not None:
        e, f, (stride_fr, stride_fn) = lowrank
        R = e.shape[1]
    else:
        e, f, stride_fr, stride_fn, R = out, out, 0, 0, 0
    if glu is not None:
        g, u, du, h = glu
        assert g.stride(1) == u.stride(1) == du.stride(1) == 1 and out.stride(1) == 1
        h_stride = h.stride(0) if h is not None else 0
        h = out if h is None else h
    else:
        g = u = du = h = out
        h_stride = 0
    assert residual is None or (glu is None and residual.stride(1) == 1)
    args = (
        segs[0][0], segs[1][0], segs[2][0], b, out,
        bias if bias is not None else out, scale if scale is not None else out, e, f, g, u, du, h,
        residual if residual is not None else out,
        M, N, R, ks[0], ks[1], ks[2], segs[0][1], segs[1][1], segs[2][1], *(rank_map or NO_RANK_MAP),
        segs[0][0].stride(0), segs[0][0].stride(1), segs[1][0].stride(0), segs[1][0].stride(1),
        segs[2][0].stride(0), segs[2][0].stride(1),
        b_strides[0], b_strides[1], out.stride(0), out.stride(1),
        e.stride(0), e.stride(1), stride_fr, stride_fn,
        g.stride(0), u.stride(0), du.stride(0), h_stride, residual.stride(0) if residual is not None else 0, _pow2(M),
    )
    flags = dict(NUM_SEGS=len(segments), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                 HAS_RESIDUAL=residual is not None,
                 HAS_LOWRANK=lowrank is not None and R > 0, GLU_BWD=glu is not None,
                 ACTIVATION=activation, STORE_H=glu is not None and glu[3] is not None,
                 BLOCK_R=min(64, max(16, _pow2(R))), MAP_LOWRANK=rank_map is not None and lowrank is not None,
                 MAP_SEGMENTS=rank_map is not None and lowrank is None and not stacked_out, MAP_OUTPUT=stacked_out,
                 DOT_PRECISION=dot_precision(segments[0][0].dtype))
    if skinny:
        flags["BLOCK_N"] = min(256, max(16, _pow2(N)))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    tuned = _tuned_skinny if skinny else _tuned_glu if glu is not None else _tuned_main
    launch(_lowrank_mm, tuned, grid, *args,
           interpreted=INTERPRETER_SKINNY if skinny else INTERPRETER_MAIN, **flags)
    return out


_SCALES: dict = {}


def _scale_vector(ranks, scalings, device) -> torch.Tensor:
    """float32 [sum r_i]: s_i repeated r_i times; cached, so no host-to-device copy per call."""
    key = (device, tuple(ranks), tuple(float(s) for s in scalings))
    vec = _SCALES.get(key)
    if vec is None:
        per_rank = [float(s) for r, s in zip(ranks, scalings, strict=True) for _ in range(r)]
        vec = torch.tensor(per_rank, dtype=torch.float32, device=device)
        _SCALES[key] = vec
    return vec


@dataclass(frozen=True)
class _Plan:
    """Column blocks of a stacked projection and where each adapter's ranks sit in the stack."""

    splits: tuple  # out features n_i
    offsets: tuple  # first output column of projection i
    ranks: tuple  # r_i, 0 without adapter
    r_offsets: tuple  # first column of U / V of adapter i
    scalings: tuple

    @staticmethod
    def make(splits, ranks, scalings):
        offsets, r_offsets, o, ro = [], [], 0, 0
        for n, r in zip(splits, ranks, strict=True):
            offsets.append(o)
            r_offsets.append(ro)
            o, ro = o + n, ro + r
        return _Plan(tuple(splits), tuple(offsets), tuple(ranks), tuple(r_offsets), tuple(scalings))


NO_RANK_MAP = (1 << 30, 1 << 30, 0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class _Adapters:
    """A group's adapters as the kernels read them, in the masters' dtype (float32: read in place, never cast).

    a: [R, in], the A_i stacked by rows. b: with rank_map, the B_i stacked by rows [sum n_i, r] (block i of the
    block-diagonal B, which is never materialised: rank_map says where each projection's ranks sit); without,
    the B of a single projection, or the block-diagonal B of a group whose ranks differ or that has a projection
    without adapter. When the A_i (B_i) are adjacent views of one buffer (inject_lora stacks a layer's q/k/v and
    gate/up adapters so) the stack is a view; otherwise one copy per call.
    """

    a: torch.Tensor
    b: torch.Tensor
    rank_map: tuple | None  # (c1, c2, ro0, ro1, ro2, rw0, rw1, rw2): _gemm.rank_window

    @staticmethod
    def make(plan: _Plan, lora_as, lora_bs) -> _Adapters | None:
        adapted = [i for i, r in enumerate(plan.ranks) if r]
        if not adapted:
            return None
        if len(plan.splits) == 1:
            return _Adapters(lora_as[0], lora_bs[0], None)
        a = _rows([lora_as[i] for i in adapted])
        if len(adapted) == len(plan.splits) <= MAX_SEGMENTS and len(set(plan.ranks)) == 1:
            pad = [0] * (MAX_SEGMENTS - len(plan.splits))
            bounds = (*plan.offsets[1:], *[NO_RANK_MAP[0]] * (MAX_SEGMENTS - len(plan.splits)))
            return _Adapters(a, _rows(lora_bs), (*bounds, *plan.r_offsets, *pad, *plan.ranks, *pad))
        ref = lora_bs[adapted[0]]
        blocks = [lora_bs[i] if plan.ranks[i] else ref.new_zeros(n, 0) for i, n in enumerate(plan.splits)]
        return _Adapters(a, torch.block_diag(*blocks), None)

    def dense_b(self, plan: _Plan) -> torch.Tensor:
        """The block-diagonal B itself (for the fused NF4 GEMM, which reads no rank map)."""
        if self.rank_map is None:
            return self.b
        return torch.block_diag(*self.b.split(list(plan.splits), 0))


def _rows(parts) -> torch.Tensor:
    """parts [n_i, k] stacked by rows: a view when they lie one after another in one buffer, else a copy."""
    first = parts[0]
    if len(parts) == 1:
        return first
    same = all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in parts)
    if same and all(p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for p in parts):
        offsets = [p.storage_offset() for p in parts]
        if all(offsets[i + 1] == offsets[i] + parts[i].numel() for i in range(len(parts) - 1)):
            return first.as_strided((sum(p.shape[0] for p in parts), *first.shape[1:]), first.stride())
    return torch.cat(parts, 0)


def _grad_mm(a, b) -> torch.Tensor:
    """a @ b in float32: the gradient of a float32 LoRA master from 16-bit operands, accumulated and written in
    float32 by the one GEMM (no cast launch after it, and no rounding to 16 bits on the way)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    out = empty_output((a.shape[0], b.shape[1]), torch.float32, a.device)  # CPU torch has no mm with out_dtype
    if out.numel():
        _mm(out, [(a, 0)], b, (b.stride(0), b.stride(1)))
    return out


def _grad_b_stacked(segs, u, adapters: _Adapters, plan: _Plan) -> torch.Tensor | None:
    """The dB_i = dY_i^T U_i of a group in one GEMM, stacked by rows [sum n_i, r] in float32 (each block a
    contiguous [n_i, r], the layout of the masters' grads), when the dY_i are one matrix (the columns of one
    buffer: one segment) and the ranks sit in a rank map. Its row m reads all of U and keeps its own ranks
    (the product is R / r times the dB's columns, a GEMM with r columns beside the dX GEMM's thousands). None
    otherwise: one GEMM per projection."""
    if adapters.rank_map is None or len(segs) != 1 or segs[0][1] != 0 or segs[0][0].shape[1] != sum(plan.splits):
        return None
    dy_all = segs[0][0]
    out = empty_output((dy_all.shape[1], plan.ranks[0]), torch.float32, dy_all.device)
    t = dy_all.t()
    return _mm(out, [(t, 0)], u, (u.stride(0), u.stride(1)), skinny=True, rank_map=adapters.rank_map,
               stacked_out=True)


def _fused_nf4(weight) -> bool:
    """Whether this GEMM reads the NF4 weight in its tiles (LORAFUSE_NF4_GEMM=fused) instead of a dequantized copy."""
    return is_nf4(weight) and weight.nested and gemm_mode() == "fused"


def _lowrank_forward(x2d, weight, bias, adapters: _Adapters | None, plan: _Plan, scale, out, residual=None):
    """out = x W^T + bias + U B^T (+ residual) with U = x A^T diag(s); returns U (None without adapters). An NF4
    weight is dequantized here, for this GEMM only (or read by the fused NF4 GEMM)."""
    if adapters is None:
        u = lowrank = rank_map = None
    else:
        a = adapters.a
        u = empty_output((x2d.shape[0], a.shape[0]), x2d.dtype, x2d.device)
        _mm(u, [(x2d, 0)], a, (a.stride(1), a.stride(0)), scale=scale, skinny=True)
        b, rank_map = (adapters.dense_b(plan), None) if _fused_nf4(weight) else (adapters.b, adapters.rank_map)
        lowrank = (u, b, (b.stride(1), b.stride(0)))
    if _fused_nf4(weight):
        nf4_matmul(out, x2d, weight, transpose=True, bias=bias, lowrank=lowrank)
        if residual is not None:
            out.add_(residual)
        return u
    weight = dense_weight(weight, x2d.dtype)
    _mm(out, [(x2d, 0)], weight, (weight.stride(1), weight.stride(0)), bias=bias, lowrank=lowrank, rank_map=rank_map,
        residual=residual)
    return u


def _segments(dys, offsets, splits):
    """The present dY_i as (tensor, first column); column-adjacent views of one buffer are merged."""
    segs = []
    for dy, off in zip(dys, offsets, strict=True):
        if dy is None:
            continue
        if segs:
            prev, prev_off = segs[-1]
            if (prev_off + prev.shape[1] == off and prev.stride() == dy.stride() and prev.stride(1) == 1
                    and dy.data_ptr() == prev.data_ptr() + prev.shape[1] * prev.element_size()):
                merged = prev.as_strided((prev.shape[0], prev.shape[1] + dy.shape[1]), prev.stride())
                segs[-1] = (merged, prev_off)
                continue
        segs.append((dy, off))
    if len(segs) > MAX_SEGMENTS:  # more projections than the kernel takes pieces: one copy
        rows = segs[0][0].shape[0]
        full = torch.cat([dy if dy is not None else segs[0][0].new_zeros(rows, n)
                          for dy, n in zip(dys, splits, strict=True)], 1)
        segs = [(full, 0)]
    return segs


def _lowrank_backward(plan, dys, x2d, weight, adapters: _Adapters | None, u, scale, need_dx, need_dw, need_dbias,
                      need_ab):
    """Gradients of the (stacked) LoRA linear from the dY_i [T, n_i] (None: no gradient reached it)."""
    T, K = x2d.shape
    segs = _segments(dys, plan.offsets, plan.splits)
    dx = dw = dbias = None
    das, dbs = [None] * len(plan.splits), [None] * len(plan.splits)
    if need_dx:
        dx = empty_output((T, K), x2d.dtype, x2d.device)
        if not segs:
            dx.zero_()
    v = None
    if segs and adapters is not None and (need_dx or any(need_ab)):
        a, b = adapters.a, adapters.b
        v = empty_output((T, a.shape[0]), x2d.dtype, x2d.device)
        _mm(v, segs, b, (b.stride(0), b.stride(1)), scale=scale, skinny=True, rank_map=adapters.rank_map)
    if need_dx and segs:
        lowrank = (v, adapters.a, (adapters.a.stride(0), adapters.a.stride(1))) if v is not None else None
        if _fused_nf4(weight):  # one dY: the fused GEMM reads a single segment
            dy_all = segs[0][0] if len(segs) == 1 and segs[0][1] == 0 and segs[0][0].shape[1] == weight.shape[0] \
                else torch.cat([dy if dy is not None else x2d.new_zeros(T, n) for dy, n in zip(dys, plan.splits,
                                                                                               strict=True)], 1)
            nf4_matmul(dx, dy_all, weight, transpose=False, lowrank=lowrank)
        else:
            weight = dense_weight(weight, x2d.dtype)
            _mm(dx, segs, weight, (weight.stride(0), weight.stride(1)), lowrank=lowrank)
    if v is not None and any(need_ab):
        da_stack = _grad_mm(v.t(), x2d)  # float32, like the masters
    grad_dtype = adapters.a.dtype if adapters is not None else x2d.dtype
    db_stack = _grad_b_stacked(segs, u, adapters, plan) if v is not None and all(need_ab) else None
    for i, (n, r, r_off) in enumerate(zip(plan.splits, plan.ranks, plan.r_offsets, strict=True)):
        if r and need_ab[i]:
            das[i] = da_stack[r_off:r_off + r] if v is not None else x2d.new_zeros(r, K, dtype=grad_dtype)
            if db_stack is not None:
                dbs[i] = db_stack[plan.offsets[i]:plan.offsets[i] + n]
            elif dys[i] is not None:
                dbs[i] = _grad_mm(dys[i].t(), u[:, r_off:r_off + r])
            else:
                dbs[i] = x2d.new_zeros(n, r, dtype=grad_dtype)
    if need_dw:  # a dense weight that trains (never an NF4 one)
        dw = torch.empty_like(weight)
        for dy, off, n in zip(dys, plan.offsets, plan.splits, strict=True):
            if dy is None:
                dw[off:off + n].zero_()
            else:
                torch.mm(dy.t(), x2d, out=dw[off:off + n])
    if need_dbias:
        dbias = torch.cat([dy.sum(0) if dy is not None else x2d.new_zeros(n)
                           for dy, n in zip(dys, plan.splits, strict=True)])
    return dx, dw, dbias, das, dbs


# ----------------------------------------------------------------------------- autograd Functions


def _keep_input(ctx, x2d, normed: NormedInput | None) -> tuple:
    """What a Function keeps of its input x for dA: x itself, or, when x is an rms_norm output (normed), the
    norm's input h and weight, which the norm keeps anyway (_input_again rebuilds x from them)."""
    if normed is None:
        ctx.normed = None
        return x2d, None
    ctx.normed = normed._replace(h=None, weight=None)  # the tensors go through save_for_backward
    return normed.h.reshape(x2d.shape), normed.weight


def _input_again(ctx, kept_x, norm_weight):
    if ctx.normed is None:
        return kept_x
    return ctx.normed._replace(weight=norm_weight).values(kept_x).reshape(kept_x.shape)


class LoraGroupFunction(torch.autograd.Function):
    """y_i = x W_i^T + bias_i + s_i (x A_i^T) B_i^T for the stacked weight; one projection is lora_linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: _Plan, normed: NormedInput | None, *adapters):
        lora_as, lora_bs = list(adapters[0::2]), list(adapters[1::2])
        x2d = x.reshape(-1, x.shape[-1])
        adapters = _Adapters.make(plan, lora_as, lora_bs)
        scale = _scale_vector(plan.ranks, plan.scalings, x.device) if adapters is not None else None
        n_total = sum(plan.splits)
        out = empty_output((*x.shape[:-1], n_total), x.dtype, x.device)
        u = _lowrank_forward(x2d, weight, bias, adapters, plan, scale, out.view(-1, n_total))
        ctx.set_materialize_grads(False)
        ctx.nf4 = weight if is_nf4(weight) else None  # dequantized again in backward, not kept dense
        a, b = (adapters.a, adapters.b) if adapters is not None else (None, None)
        ctx.save_for_backward(*_keep_input(ctx, x2d, normed), None if ctx.nf4 is not None else weight, a, b, u)
        ctx.plan, ctx.scale, ctx.x_shape = plan, scale, x.shape
        ctx.rank_map = adapters.rank_map if adapters is not None else None
        if len(plan.splits) == 1:
            return out
        return tuple(out.split(list(plan.splits), -1))

    @staticmethod
    def backward(ctx, *grads):
        kept_x, norm_weight, weight, a, b, u = ctx.saved_tensors
        plan = ctx.plan
        adapters = _Adapters(a, b, ctx.rank_map) if a is not None else None
        dys = [g.reshape(-1, g.shape[-1]) if g is not None else None for g in grads]
        needs = ctx.needs_input_grad
        need_ab = [needs[5 + 2 * i] or needs[6 + 2 * i] for i in range(len(plan.splits))]
        # x itself is read only by dA and dW; dX needs its shape alone
        x2d = _input_again(ctx, kept_x, norm_weight) if any(need_ab) or needs[1] else kept_x
        if ctx.nf4 is not None:
            weight = ctx.nf4
        dx, dw, dbias, das, dbs = _lowrank_backward(plan, dys, x2d, weight, adapters, u, ctx.scale,
                                                    needs[0], needs[1], needs[2], need_ab)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        adapter_grads = [g for pair in zip(das, dbs, strict=True) for g in pair]
        return (dx, dw, dbias, None, None, *adapter_grads)


class LoraMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)); h is recomputed in the backward GEMM's SwiGLU/GeGLU epilogue."""

    @staticmethod
    def forward(ctx, x, gate_up_weight, down_weight, plan_gu: _Plan, plan_down: _Plan, gate_a, gate_b, up_a,
                up_b, down_a, down_b, activation: str, normed: NormedInput | None, residual):
        inter, hidden = down_weight.shape[1], down_weight.shape[0]
        x2d = x.reshape(-1, x.shape[-1])
        T = x2d.shape[0]
        adapters_gu = _Adapters.make(plan_gu, [gate_a, up_a], [gate_b, up_b])
        scale_gu = _scale_vector(plan_gu.ranks, plan_gu.scalings, x.device) if adapters_gu is not None else None
        gu = empty_output((T, 2 * inter), x.dtype, x.device)
        u_gu = _lowrank_forward(x2d, gate_up_weight, None, adapters_gu, plan_gu, scale_gu, gu)
        h = glu_forward_triton(gu[:, :inter], gu[:, inter:], out=empty_output((T, inter), x.dtype, x.device),
                               activation=activation)
        scale_d = _scale_vector(plan_down.ranks, plan_down.scalings, x.device) if down_a is not None else None
        out = empty_output((*x.shape[:-1], hidden), x.dtype, x.device)
        adapters_d = _Adapters.make(plan_down, [down_a], [down_b])
        res2d = residual.reshape(-1, hidden) if residual is not None else None
        u_d = _lowrank_forward(h, down_weight, None, adapters_d, plan_down, scale_d, out.view(-1, hidden), res2d)
        # NF4 weights are dequantized again in backward, one at a time; dense ones are saved
        weights = (gate_up_weight, down_weight)
        ctx.nf4 = tuple(w if is_nf4(w) else None for w in weights)
        saved = [None if is_nf4(w) else w for w in weights]
        a_gu, b_gu = (adapters_gu.a, adapters_gu.b) if adapters_gu is not None else (None, None)
        ctx.save_for_backward(*_keep_input(ctx, x2d, normed), *saved, a_gu, b_gu, u_gu, gu, down_a, down_b, u_d)
        ctx.rank_map = adapters_gu.rank_map if adapters_gu is not None else None
        ctx.plan_gu, ctx.scales, ctx.x_shape, ctx.activation = plan_gu, (scale_gu, scale_d), x.shape, activation
        return out

    @staticmethod
    def backward(ctx, dy):
        kept_x, norm_weight, gu_weight, down_weight, a_gu, b_gu, u_gu, gu, down_a, down_b, u_d = ctx.saved_tensors
        plan_gu, (scale_gu, scale_d) = ctx.plan_gu, ctx.scales
        needs = ctx.needs_input_grad
        if ctx.nf4[1] is not None:  # the dH GEMM with the GLU epilogue reads a dense weight, in both NF4 modes
            down_weight = dense_weight(ctx.nf4[1], kept_x.dtype)
        inter = down_weight.shape[1]
        T = kept_x.shape[0]
        dy = dy.reshape(-1, dy.shape[-1])
        need_down_ab = needs[9] or needs[10]
        need_h = (down_a is not None and need_down_ab) or needs[2]

        # dH = dY W_d + V_d A_d, with the SwiGLU/GeGLU backward applied on the tile: writes dG, dU (and h).
        v_d = None
        if down_a is not None:
            v_d = empty_output((T, down_a.shape[0]), dy.dtype, dy.device)
            _mm(v_d, [(dy, 0)], down_b, (down_b.stride(0), down_b.stride(1)), scale=scale_d, skinny=True)
        dgu = empty_output((T, 2 * inter), dy.dtype, dy.device)
        h = empty_output((T, inter), dy.dtype, dy.device) if need_h else None
        lowrank = (v_d, down_a, (down_a.stride(0), down_a.stride(1))) if v_d is not None else None
        _mm(dgu[:, :inter], [(dy, 0)], down_weight, (down_weight.stride(0), down_weight.stride(1)),
            lowrank=lowrank, glu=(gu[:, :inter], gu[:, inter:], dgu[:, inter:], h), activation=ctx.activation)
        d_down_a = d_down_b = d_down_w = None
        if down_a is not None and need_down_ab:
            d_down_a = _grad_mm(v_d.t(), h)
            d_down_b = _grad_mm(dy.t(), u_d)
        if needs[2]:
            d_down_w = dy.t() @ h

        del down_weight  # before the gate/up weight is dequantized: one dense weight at a time
        if ctx.nf4[0] is not None:
            gu_weight = ctx.nf4[0]
        dys = [dgu[:, :inter], dgu[:, inter:]]
        need_ab = [needs[5] or needs[6], needs[7] or needs[8]]
        x2d = _input_again(ctx, kept_x, norm_weight) if any(need_ab) or needs[1] else kept_x
        adapters_gu = _Adapters(a_gu, b_gu, ctx.rank_map) if a_gu is not None else None
        dx, d_gu_w, _, das, dbs = _lowrank_backward(plan_gu, dys, x2d, gu_weight, adapters_gu, u_gu, scale_gu,
                                                    needs[0], needs[1], False, need_ab)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        # out = residual + ...: the residual's gradient is dY itself
        d_residual = dy.reshape(*ctx.x_shape[:-1], dy.shape[-1]) if needs[13] else None
        return (dx, d_gu_w, d_down_w, None, None, das[0], dbs[0], das[1], dbs[1], d_down_a, d_down_b, None, None,
                d_residual)


# ----------------------------------------------------------------------------- public functions


def _cast(t, dtype):
    return t if t is None or is_nf4(t) or t.dtype == dtype else t.to(dtype)  # NF4: dequantized to dtype


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(x):
    """x's dtype, or autocast's (as F.linear would compute in); one the kernels support."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lorafuse LoRA kernels take float16, bfloat16 or float32 inputs, not {dtype} "
                        "(LORAFUSE_KERNELS=reference runs any dtype)")
    return dtype


def _check_adapter(name, a, b, n_out, n_in):
    if (a is None) != (b is None):
        raise ValueError(f"{name}: lora_a and lora_b must both be given or both be None")
    if a is None:
        return 0
    r = a.shape[0]
    if a.dim() != 2 or a.shape[1] != n_in or tuple(b.shape) != (n_out, r):
        raise ValueError(f"{name}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not fit "
                         f"[r, {n_in}] / [{n_out}, r]")
    return r


def lora_linear(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """y = x @ weight.T + bias + scaling * (x @ lora_a.T) @ lora_b.T (see module docstring).

    x [..., in] (any strides); weight [out, in], a tensor or an nf4.NF4Weight (frozen); lora_a [r, in];
    lora_b [out, r] (both None: the frozen linear alone); bias [out] or None.
    Differentiable in x, lora_a, lora_b, and in weight / bias when they require grad.
    """
    if lora_gemm_path(x, weight) == "cublas":  # LORAFUSE_LORA_GEMM (lora_cublas.py)
        from .lora_cublas import lora_linear as cublas_lora_linear
        return cublas_lora_linear(x, weight, lora_a, lora_b, scaling, bias)
    if not use_triton(x):
        return lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias)
    count("lora_linear")
    dtype = _compute_dtype(x)
    x, weight, bias = (_cast(t, dtype) for t in (x, weight, bias))  # the adapters are read in their own dtype
    r = _check_adapter("lora_linear", lora_a, lora_b, weight.shape[0], weight.shape[1])
    plan = _Plan.make((weight.shape[0],), (r,), (scaling,))
    return LoraGroupFunction.apply(x, weight, bias, plan, None, lora_a, lora_b)


def lora_linear_group(x, weight, lora_as, lora_bs, scalings, out_splits, bias=None, *,
                      normed_from: NormedInput | None = None) -> tuple:
    """Several LoRA projections of one input whose frozen weights are stacked (module docstring).

    weight [sum(out_splits), in] = [W_0; W_1; ...]; lora_as[i] [r_i, in] and lora_bs[i] [out_splits[i], r_i]
    (both None for a projection without adapter); scalings[i] floats; bias [sum(out_splits)] or None.
    normed_from: when x is rms_norm(h, weight, eps, offset), those (rms_norm.NormedInput): the Triton path
    then keeps h, not x, and rebuilds x in backward (the other paths keep x; the values are the same).
    Returns (y_0, y_1, ...), y_i [..., out_splits[i]]: column views of one buffer (last dim contiguous;
    they may not be modified in place).
    """
    out_splits = tuple(int(n) for n in out_splits)
    if not (len(lora_as) == len(lora_bs) == len(scalings) == len(out_splits)):
        raise ValueError("lora_linear_group: lora_as, lora_bs, scalings and out_splits differ in length")
    if weight.shape[0] != sum(out_splits):
        raise ValueError(f"lora_linear_group: weight has {weight.shape[0]} rows, out_splits sum to "
                         f"{sum(out_splits)}")
    if lora_gemm_path(x, weight) == "cublas":  # LORAFUSE_LORA_GEMM (lora_cublas.py)
        from .lora_cublas import lora_linear_group as cublas_group
        return cublas_group(x, weight, lora_as, lora_bs, scalings, out_splits, bias)
    if not use_triton(x):
        return lora_linear_group_reference(x, weight, lora_as, lora_bs, scalings, out_splits, bias)
    count("lora_linear_group")
    dtype = _compute_dtype(x)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)  # adapters: in their own dtype
    ranks = tuple(_check_adapter(f"lora_linear_group[{i}]", a, b, n, weight.shape[1])
                  for i, (a, b, n) in enumerate(zip(lora_as, lora_bs, out_splits, strict=True)))
    plan = _Plan.make(out_splits, ranks, tuple(float(s) for s in scalings))
    adapters = [t for pair in zip(lora_as, lora_bs, strict=True) for t in pair]
    if normed_from is not None:
        normed_from.check(x, "lora_linear_group")
    outs = LoraGroupFunction.apply(x, weight, bias, plan, normed_from, *adapters)
    return outs if isinstance(outs, tuple) else (outs,)


def lora_mlp(x, gate_up_weight, gate_a, gate_b, gate_scaling, up_a, up_b, up_scaling,
             down_weight, down_a, down_b, down_scaling, activation: str = "silu", *,
             normed_from: NormedInput | None = None, residual=None):
    """down(act(gate(x)) * up(x)) (+ residual), each projection a LoRA linear (A/B None: the plain frozen linear).

    x [..., H]; gate_up_weight [2 I, H] = [W_gate; W_up]; down_weight [H, I]; no biases.
    activation: "silu" (SwiGLU: Llama, Mistral, Qwen) or "gelu_tanh" (GeGLU with PyTorch's
    F.gelu(approximate="tanh"), HF's gelu_pytorch_tanh: Gemma). normed_from: as in lora_linear_group.
    residual [..., H] (x's shape and dtype), or None: added to the output, by the down projection's GEMM on the
    Triton path (the decoder's residual add without a launch of its own; rounded once).
    """
    check_activation(activation)
    hidden, inter = down_weight.shape
    if gate_up_weight.shape != (2 * inter, hidden):
        raise ValueError(f"lora_mlp: gate_up_weight {tuple(gate_up_weight.shape)} is not "
                         f"[2 * {inter}, {hidden}]")
    if lora_gemm_path(x, gate_up_weight) == "cublas" and lora_gemm_path(x, down_weight) == "cublas":
        from .lora_cublas import lora_mlp as cublas_mlp  # LORAFUSE_LORA_GEMM (lora_cublas.py)
        out = cublas_mlp(x, gate_up_weight, gate_a, gate_b, gate_scaling, up_a, up_b, up_scaling, down_weight,
                         down_a, down_b, down_scaling, activation)
        return out if residual is None else residual + out
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"lora_mlp: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} "
                         f"{x.dtype}, with a unit last stride")
    if not use_triton(x):
        return lora_mlp_reference(x, gate_up_weight, gate_a, gate_b, gate_scaling, up_a, up_b, up_scaling,
                                  down_weight, down_a, down_b, down_scaling, activation, residual=residual)
    count("lora_mlp")
    dtype = _compute_dtype(x)
    x, gate_up_weight, down_weight = _cast(x, dtype), _cast(gate_up_weight, dtype), _cast(down_weight, dtype)
    ranks = (_check_adapter("lora_mlp gate", gate_a, gate_b, inter, hidden),
             _check_adapter("lora_mlp up", up_a, up_b, inter, hidden))
    r_down = _check_adapter("lora_mlp down", down_a, down_b, hidden, inter)
    plan_gu = _Plan.make((inter, inter), ranks, (float(gate_scaling), float(up_scaling)))
    plan_down = _Plan.make((hidden,), (r_down,), (float(down_scaling),))
    if normed_from is not None:
        normed_from.check(x, "lora_mlp")
    return LoraMLPFunction.apply(x, gate_up_weight, down_weight, plan_gu, plan_down, gate_a, gate_b, up_a,
                                 up_b, down_a, down_b, activation, normed_from, residual)

"""Rotary position embedding with per-document positions (HF's rotate-half convention).

For position p and frequency f_j = inv_freq[j] (j < D/2), angle a = p * f_j, and s = attention_scaling:
  out[j]       = s * (x[j] cos a - x[j + D/2] sin a)
  out[j + D/2] = s * (x[j + D/2] cos a + x[j] sin a)
position_ids restart at 0 in each packed document. The backward is the rotation by -a:
  dx[j]       = s * (dout[j] cos a + dout[j + D/2] sin a)
  dx[j + D/2] = s * (dout[j + D/2] cos a - dout[j] sin a)
The angle is float32(p) * inv_freq[j] rounded to float32, exactly as HF's rotary embedding forms it
(inv_freq already carries Llama-3 / YaRN scaling); cos and sin are then taken in float32 in the
kernel (precise libdevice cosf/sinf on NVIDIA, with full range reduction), never as [T, D] tables.
Everything is computed in float32 and rounded once to the input dtype (HF rounds cos/sin to the
input dtype first, so it is slightly less accurate in bf16/fp16).

Tiling: one kernel rotates q and k together. A program takes BLOCK_T tokens: it loads their
positions, forms cos/sin [BLOCK_T, D/2] once, then loops over the query heads and then the
key heads in chunks of BLOCK_H, each chunk a [BLOCK_T, BLOCK_H, D/2] tile loaded as two halves
(x[:D/2] and x[D/2:]) and stored as two halves. Optionally the same launch copies v (COPY_V), so a caller
that split q, k and v out of one fused buffer keeps three tensors of their own. Head dims that are not
powers of two (80, 96) are masked to the next power of two. Nothing is saved for backward but position_ids and inv_freq.

Strides: q [T, Hq, D] and k [T, Hkv, D] may be views with any token and head strides (the engine
splits a fused qkv projection output, token stride > H * D); the head dim must have stride 1
(otherwise it is copied). Outputs are new contiguous tensors; offsets are int64.
"""

from __future__ import annotations

import torch

from ._dispatch import HAVE_TRITON, use_triton
from ._launch import aot_spec, count, device_arch, empty_output, launch


def apply_rope_reference(q, k, position_ids, inv_freq, attention_scaling: float = 1.0, v=None):
    """q [T, Hq, D], k [T, Hkv, D], position_ids [T] -> rotated (q, k), computed in float32 (and v as given)."""
    freqs = position_ids[:, None].float() * inv_freq[None, :].float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling)[:, None, :]
    sin = (emb.sin() * attention_scaling)[:, None, :]

    def rotate(x):
        x32 = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return (rotate(q), rotate(k)) if v is None else (rotate(q), rotate(k), v)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, stride_t, stride_h, OUT, out_stride_t, n_heads, tokens64, token_ok, j, j_ok, cos3, sin3,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        for h0 in range(0, n_heads, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            tile_ok = token_ok[:, None, None] & (heads < n_heads)[None, :, None] & j_ok[None, None, :]
            in_off = (tokens64 * stride_t)[:, None, None] + (heads.to(tl.int64) * stride_h)[None, :, None] \
                + j[None, None, :]
            x_lo = tl.load(X + in_off, mask=tile_ok, other=0.0).to(tl.float32)
            x_hi = tl.load(X + in_off + HALF, mask=tile_ok, other=0.0).to(tl.float32)
            out_lo = x_lo * cos3 - x_hi * sin3
            out_hi = x_hi * cos3 + x_lo * sin3
            out_off = (tokens64 * out_stride_t)[:, None, None] + (heads * (2 * HALF))[None, :, None] + j[None, None, :]
            tl.store(OUT + out_off, out_lo.to(OUT.dtype.element_ty), mask=tile_ok)
            tl.store(OUT + out_off + HALF, out_hi.to(OUT.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _copy_heads(X, stride_t, stride_h, OUT, out_stride_t, n_heads, tokens64, token_ok, j, j_ok,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        for h0 in range(0, n_heads, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            tile_ok = token_ok[:, None, None] & (heads < n_heads)[None, :, None] & j_ok[None, None, :]
            in_off = (tokens64 * stride_t)[:, None, None] + (heads.to(tl.int64) * stride_h)[None, :, None] \
                + j[None, None, :]
            out_off = (tokens64 * out_stride_t)[:, None, None] + (heads * (2 * HALF))[None, :, None] + j[None, None, :]
            tl.store(OUT + out_off, tl.load(X + in_off, mask=tile_ok), mask=tile_ok)
            tl.store(OUT + out_off + HALF, tl.load(X + in_off + HALF, mask=tile_ok), mask=tile_ok)

    @triton.jit
    def _rope_kernel(
        Q, stride_q_t, stride_q_h, K, stride_k_t, stride_k_h,
        Q_OUT, K_OUT, POS, INV_FREQ,
        n_tokens, n_q_heads, n_kv_heads, scaling,
        V, stride_v_t, stride_v_h, V_OUT, out_stride_q, out_stride_kv,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
        BACKWARD: tl.constexpr, COPY_V: tl.constexpr = False,
    ):
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = tokens < n_tokens
        tokens64 = tokens.to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        j_ok = j < HALF
        pos = tl.load(POS + tokens64, mask=token_ok, other=0).to(tl.float32)
        inv_freq = tl.load(INV_FREQ + j, mask=j_ok, other=0.0).to(tl.float32)
        angle = pos[:, None] * inv_freq[None, :]
        # cos/sin once per token tile, shared by every head of q and k.
        cos_tile = tl.cos(angle) * scaling
        sin_tile = tl.sin(angle) * scaling
        if BACKWARD:  # the transpose of a rotation is the rotation by -angle
            sin_tile = -sin_tile
        cos3 = cos_tile[:, None, :]
        sin3 = sin_tile[:, None, :]
        _rotate_heads(Q, stride_q_t, stride_q_h, Q_OUT, out_stride_q, n_q_heads, tokens64, token_ok, j, j_ok,
                      cos3, sin3, HALF, BLOCK_H)
        _rotate_heads(K, stride_k_t, stride_k_h, K_OUT, out_stride_kv, n_kv_heads, tokens64, token_ok, j, j_ok,
                      cos3, sin3, HALF, BLOCK_H)
        if COPY_V:  # v out of the fused q/k/v buffer, so attention keeps q, k and v, not that buffer
            _copy_heads(V, stride_v_t, stride_v_h, V_OUT, out_stride_kv, n_kv_heads, tokens64, token_ok, j, j_ok,
                        HALF, BLOCK_H)

    def _prune_rope_configs(configs, named_args, **kwargs):
        """Drop head chunks wider than both head counts need; keep tiles of 16..64 elements per thread (at 8, with
        head dim 128, ptxas spills a few bytes on sm_80 and sm_90: python -m lorafuse.kernels.aot --report)."""
        heads = max(named_args["n_q_heads"], named_args["n_kv_heads"])
        block_half = kwargs["BLOCK_HALF"]
        # copying v too, 2 tokens x 16 heads on 4 warps at head dim 128 spills 48 B per thread on sm_90
        spilling = {(2, 16, 4)} if kwargs.get("COPY_V") and device_arch() == 90 and block_half == 64 else set()
        kept = [c for c in configs
                if c.kwargs["BLOCK_H"] <= max(2, triton.next_power_of_2(heads))
                and 16 <= c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_H"] * block_half // (32 * c.num_warps) <= 64
                and (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_H"], c.num_warps) not in spilling]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_H"])]

    _ROPE_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w)
                     for bt, bh, w in ((1, 8, 4), (2, 8, 4), (4, 8, 4), (4, 4, 4), (2, 16, 4), (4, 16, 8),
                                       (8, 8, 8), (1, 2, 4), (2, 2, 4))]
    _rope_tuned = triton.autotune(
        _ROPE_CONFIGS, key=["n_q_heads", "n_kv_heads", "HALF", "BACKWARD", "COPY_V"],
        prune_configs_by={"early_config_prune": _prune_rope_configs},
    )(_rope_kernel)

    def _aot(dtype, half, block_t, block_h, backward, copy_v=False):
        # the tensors here have capital names, not *_ptr ones; positions are int64, inv_freq float32
        types = {"Q K Q_OUT K_OUT V V_OUT": f"*{dtype}", "POS": "*i64", "INV_FREQ": "*fp32", "scaling": "fp32"}
        constexprs = {"HALF": half, "BLOCK_HALF": triton.next_power_of_2(half), "BLOCK_T": block_t,
                      "BLOCK_H": block_h, "BACKWARD": backward, "COPY_V": copy_v}
        return aot_spec(_rope_kernel, dtype, constexprs, types=types)

    # the static gate compiles head dim 128's and 256's forward (with and without v) and backward (with v) as the
    # engine launches them; these are the rest
    AOT_SPECS = [
        _aot("bf16", 64, 2, 16, True),   # backward without v
        _aot("bf16", 40, 4, 4, False),   # head_dim 80, masked to 64
        _aot("fp16", 32, 8, 8, True),    # head_dim 64
        _aot("fp32", 128, 1, 8, False),  # head_dim 256 (Gemma)
    ]


def _rope(q, k, position_ids, inv_freq, scaling: float, backward: bool, v=None, fused_out: bool = False):
    """Rotate q and k (or, with backward, their gradients) in one launch, and copy v (shaped like k) when given.
    Returns new tensors: contiguous ones, or with fused_out (v given) views of one [T, Hq + 2 Hkv, D] buffer, q's
    heads then k's then v's (the layout of a stacked q/k/v projection output, so its backward reads the three
    gradients as one matrix)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    n_tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if fused_out:
        fused = empty_output((n_tokens, n_q_heads + 2 * n_kv_heads, head_dim), q.dtype, q.device)
        q_out, k_out, v_out = fused.split([n_q_heads, n_kv_heads, n_kv_heads], 1)
    else:
        q_out = empty_output(q.shape, q.dtype, q.device)
        k_out = empty_output(k.shape, k.dtype, k.device)
        v_out = empty_output(v.shape, v.dtype, v.device) if v is not None else None
    if n_tokens == 0:
        return q_out, k_out, v_out
    half = head_dim // 2
    v_in = v if v is not None else k
    args = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), q_out, k_out, position_ids, inv_freq,
            n_tokens, n_q_heads, n_kv_heads, scaling, v_in, v_in.stride(0), v_in.stride(1),
            v_out if v is not None else k_out, q_out.stride(0), k_out.stride(0))
    launch(_rope_kernel, _rope_tuned, lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]),), *args,
           interpreted={"BLOCK_T": 4, "BLOCK_H": 4},
           HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BACKWARD=backward, COPY_V=v is not None)
    return q_out, k_out, v_out


class _ApplyRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, scaling, v):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.scaling = scaling
        q_out, k_out, v_out = _rope(q, k, position_ids, inv_freq, scaling, backward=False, v=v)
        return (q_out, k_out) if v is None else (q_out, k_out, v_out)

    @staticmethod
    def backward(ctx, dq_out, dk_out, dv_out=None):
        position_ids, inv_freq = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        # with v: the three gradients land side by side in one buffer (dv copied by the same launch), so the
        # q/k/v projection's backward reads them as one matrix: its dB's are then one GEMM (lora_linear.py)
        fused = dv_out is not None and dq_out is not None and dk_out is not None
        dq, dk, dv = _rope(dq_out, dk_out, position_ids, inv_freq, ctx.scaling, backward=True,
                           v=dv_out if fused else None, fused_out=fused)
        return (dq if need_q else None), (dk if need_k else None), None, None, None, dv if fused else dv_out


def rope_values(x, position_ids, inv_freq, attention_scaling: float = 1.0):
    """x [T, H, D] rotated (a new contiguous tensor), without autograd, in one launch: the rotation of keys that
    are computed again in backward (varlen_attention's kv_again)."""
    if not use_triton(x):
        return apply_rope_reference(x, x[:, :0], position_ids, inv_freq, attention_scaling)[0]
    if position_ids.dim() == 2:
        position_ids = position_ids[0]
    count("rope_values")
    out, _, _ = _rope(x, x[:, :0], position_ids.contiguous(), inv_freq.float().contiguous(),
                      float(attention_scaling), backward=False)
    return out


def apply_rope(q, k, position_ids, inv_freq, attention_scaling: float = 1.0, v=None):
    """Rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at position_ids [T] (or [1, T]).

    inv_freq [D/2] is HF's (with its rope scaling); attention_scaling multiplies cos and sin as in
    HF. q and k may be strided views (head-dim stride 1). Returns new contiguous (q, k) in their
    dtypes, differentiable in q and k. With v (shaped like k), returns (q, k, v) with v copied, unrotated, by the
    same launch: q, k and v split from one fused projection output then keep nothing of that buffer alive (what
    attention saves for backward is q, k and v, not the [T, (Hq + 2 Hkv) D] buffer a view of v would hold).
    """
    if v is not None and (v.shape != k.shape or v.dtype != k.dtype or v.device != k.device):
        raise ValueError(f"apply_rope: v must be shaped like k {tuple(k.shape)}; got {tuple(v.shape)}")
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"apply_rope: expected q [T, Hq, D] and k [T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    head_dim = q.shape[2]
    if head_dim % 2 or inv_freq.dim() != 1 or inv_freq.numel() != head_dim // 2:
        raise ValueError(f"apply_rope: inv_freq must be [D/2] = [{head_dim // 2}] for head dim {head_dim} "
                         f"(partial rotary is not supported); got {tuple(inv_freq.shape)}")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.shape[0] != q.shape[0]:
        raise ValueError(f"apply_rope: position_ids must be [T] = [{q.shape[0]}]; "
                         f"got {tuple(position_ids.shape)}")
    if position_ids.is_floating_point():
        raise TypeError("apply_rope: position_ids must be an integer tensor")
    if not use_triton(q):
        return apply_rope_reference(q, k, position_ids, inv_freq, attention_scaling, v)
    if k.device != q.device or position_ids.device != q.device or inv_freq.device != q.device:
        raise ValueError("apply_rope: q, k, position_ids and inv_freq must be on one device")
    count("apply_rope")
    position_ids = position_ids.contiguous()
    inv_freq = inv_freq.float().contiguous()
    return _ApplyRope.apply(q, k, position_ids, inv_freq, float(attention_scaling), v)

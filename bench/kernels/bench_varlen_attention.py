"""varlen_attention forward + backward against its peers on the same packed documents.

GPU: bf16, head dim 128, Hq 32, Hkv 8, 16k packed tokens, either a realistic document mix (lognormal,
median 400, capped at 4096, seeded) or fixed 4k documents. FLOPs are the useful causal FLOPs counted per
document, 2 Hq D sum_b L_b^2 for the forward (4 Hq D L^2, halved by the causal mask) and 2.5x that for
the backward, so every system (the padded SDPA too) is scored on the same work; tokens/s is
`tokens` / median_ms. Peers: torch.nn.attention.varlen (FA2 kernels inside torch, where this torch has
it), FlexAttention with a document mask (compiled), SDPA on the documents padded to the longest one,
flash-attn varlen (where installed). `lorafuse_fused_qkv` runs ours on strided views of one fused qkv
tensor, as the engine calls it. Without a GPU: tiny sizes through the interpreter, ours and SDPA only.

Sliding window (Mistral-style, window 4096, one 16k-token document, same heads): ours, ours without the
window (plain causal, to show what skipping the tiles outside the window saves), flash-attn varlen with
window_size=(4095, 0), torch.nn.attention.varlen where it takes window_size, FlexAttention with a
document-causal-window mask, and SDPA with that mask dense. FLOPs count the pairs inside the window,
sum_i min(i + 1, window) per document, for every system.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from lorafuse.kernels import varlen_attention

from benchutil import SMOKE, measure

SYSTEMS = ["lorafuse", "lorafuse_fused_qkv", "torch_varlen", "flex", "sdpa_padded", "flash_attn"]
MIXES = ["lognormal", "fixed4k"]


def document_lengths(mix: str) -> list[int]:
    if SMOKE:
        return {"lognormal": [1, 7, 20, 3], "fixed4k": [16, 16]}[mix]
    if mix == "fixed4k":
        return [4096] * 4
    n_tokens, median, cap = 16384, 400, 4096
    gen = torch.Generator().manual_seed(0)
    lengths: list[int] = []
    while sum(lengths) < n_tokens:
        n = int(torch.empty(1).log_normal_(math.log(median), 1.0, generator=gen).clamp(1, cap).item())
        lengths.append(min(n, n_tokens - sum(lengths)))
    return lengths


def _leaf(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_()


def _packed_case(system, n_tokens, hq, hkv, d, cu, max_len, info, device, dtype, window=None):
    """Leaves, dout and the attend callable of a peer taking flash-attn's packed layout, causal, with a
    sliding window (i - window < j <= i) when window is given."""
    q, k, v = _leaf((n_tokens, hq, d), dtype, device), _leaf((n_tokens, hkv, d), dtype, device), \
        _leaf((n_tokens, hkv, d), dtype, device)
    dout = torch.randn(n_tokens, hq, d, dtype=dtype, device=device)
    if system == "lorafuse":
        attend = lambda: varlen_attention(q, k, v, cu, max_len, causal=True, window=window)
    elif system == "torch_varlen":
        varlen = pytest.importorskip("torch.nn.attention.varlen")
        params = inspect.signature(varlen.varlen_attn).parameters
        if window is not None:
            if "window_size" not in params:
                pytest.skip("this torch's varlen_attn takes no window_size")
            kw = {"window_size": (window - 1, 0)}
        else:
            kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
            attend = lambda: varlen.varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
        else:  # this torch has no GQA in varlen_attn: expand K/V (counted in its time)
            info["gqa"] = "expanded"
            group = hq // hkv
            expand = lambda x: x.repeat_interleave(group, 1)
            attend = lambda: varlen.varlen_attn(q, expand(k), expand(v), cu, cu, max_len, max_len, **kw)
    else:
        flash_attn = pytest.importorskip("flash_attn")
        kw = {} if window is None else {"window_size": (window - 1, 0)}
        attend = lambda: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True, **kw)
    return (q, k, v), dout, attend


def _dense_case(lengths, hq, hkv, d, device, dtype):
    """Leaves q, k, v [1, H, T, D] (FlexAttention's and masked SDPA's layout), dout and each token's document."""
    n_tokens = sum(lengths)
    leaves = (_leaf((1, hq, n_tokens, d), dtype, device), _leaf((1, hkv, n_tokens, d), dtype, device),
              _leaf((1, hkv, n_tokens, d), dtype, device))
    dout = torch.randn(1, hq, n_tokens, d, dtype=dtype, device=device)
    doc_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return leaves, dout, doc_id


def _cu_seqlens(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def _measure_fwd_bwd(benchmark, attend, leaves, dout, flops, info):
    def fwd_bwd():
        out = attend()
        torch.autograd.grad(out, leaves, dout)

    measure(benchmark, fwd_bwd, flops=flops, **info)


def _padded(x_packed, lengths, max_len):
    """[T, H, D] -> [B, H, max_len, D], zeros after each document."""
    out = x_packed.new_zeros(len(lengths), x_packed.shape[1], max_len, x_packed.shape[2])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :, :n] = x_packed[start:start + n].transpose(0, 1)
        start += n
    return out


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("system", SYSTEMS)
def test_varlen_attention_fwd_bwd(benchmark, system, mix, device, dtype):
    hq, hkv, d = (2, 1, 64) if SMOKE else (32, 8, 128)
    if SMOKE and system not in ("lorafuse", "lorafuse_fused_qkv", "sdpa_padded"):
        pytest.skip("peer needs a CUDA GPU")
    lengths = document_lengths(mix)
    n_tokens, max_len = sum(lengths), max(lengths)
    cu = _cu_seqlens(lengths, device)
    fwd_flops = 2.0 * hq * d * sum(n * n for n in lengths)
    info = dict(system=system, mix=mix, tokens=n_tokens, docs=len(lengths), max_seqlen=max_len,
                shape=f"T={n_tokens} Hq={hq} Hkv={hkv} D={d} docs={len(lengths)} {mix}", dtype=str(dtype))

    if system in ("lorafuse", "torch_varlen", "flash_attn"):
        leaves, dout, attend = _packed_case(system, n_tokens, hq, hkv, d, cu, max_len, info, device, dtype)
    elif system == "lorafuse_fused_qkv":
        fused = _leaf((n_tokens, (hq + 2 * hkv) * d), dtype, device)
        leaves = (fused,)
        dout = torch.randn(n_tokens, hq, d, dtype=dtype, device=device)

        def attend():
            q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=1)
            heads = lambda x, h: x.unflatten(1, (h, d))
            return varlen_attention(heads(q, hq), heads(k, hkv), heads(v, hkv), cu, max_len, causal=True)
    elif system == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        leaves, dout, doc_id = _dense_case(lengths, hq, hkv, d, device, dtype)
        q, k, v = leaves

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document_causal, None, None, n_tokens, n_tokens, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        attend = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    else:  # sdpa_padded: the documents padded to the longest one (layout change not timed)
        leaves = tuple(_padded(torch.randn(n_tokens, h, d, dtype=dtype, device=device), lengths, max_len)
                       .requires_grad_() for h in (hq, hkv, hkv))
        q, k, v = leaves
        dout = torch.randn(q.shape, dtype=dtype, device=device)
        info["padded_tokens"] = len(lengths) * max_len
        attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    _measure_fwd_bwd(benchmark, attend, leaves, dout, 3.5 * fwd_flops, info)


WINDOW_SYSTEMS = ["lorafuse", "lorafuse_no_window", "torch_varlen", "flex", "sdpa_masked", "flash_attn"]


@pytest.mark.parametrize("system", WINDOW_SYSTEMS)
def test_varlen_attention_sliding_window_fwd_bwd(benchmark, system, device, dtype):
    hq, hkv, d = (2, 1, 64) if SMOKE else (32, 8, 128)
    window, lengths = (8, [40, 5]) if SMOKE else (4096, [16384])
    if SMOKE and system not in ("lorafuse", "lorafuse_no_window", "sdpa_masked"):
        pytest.skip("peer needs a CUDA GPU")
    n_tokens, max_len = sum(lengths), max(lengths)
    cu = _cu_seqlens(lengths, device)
    pairs = sum(min(i + 1, window) for n in lengths for i in range(n))
    info = dict(system=system, mix=f"window{window}", tokens=n_tokens, docs=len(lengths), max_seqlen=max_len,
                window=window, shape=f"T={n_tokens} Hq={hq} Hkv={hkv} D={d} docs={len(lengths)} window={window}",
                dtype=str(dtype))
    if system in ("lorafuse", "torch_varlen", "flash_attn", "lorafuse_no_window"):
        packed = "lorafuse" if system == "lorafuse_no_window" else system
        leaves, dout, attend = _packed_case(packed, n_tokens, hq, hkv, d, cu, max_len, info, device, dtype,
                                            window=None if system == "lorafuse_no_window" else window)
    else:  # flex, sdpa_masked: [1, H, T, D] with the document-causal-window mask
        leaves, dout, doc_id = _dense_case(lengths, hq, hkv, d, device, dtype)
        q, k, v = leaves

        def document_window(b, h, q_idx, kv_idx):
            return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        if system == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block_mask = create_block_mask(document_window, None, None, n_tokens, n_tokens, device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            attend = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        else:
            pos = torch.arange(n_tokens, device=device)
            mask = document_window(None, None, pos[:, None], pos[None, :])
            attend = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    _measure_fwd_bwd(benchmark, attend, leaves, dout, 3.5 * 4.0 * hq * d * pairs, info)

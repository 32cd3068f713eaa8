"""Padding-free (varlen) attention over packed documents, with GQA.

q [T, Hq, D]; k, v [T, Hkv, D], Hq % Hkv == 0 (query head h reads key/value head h // (Hq/Hkv));
documents are the rows cu_seqlens[b] : cu_seqlens[b+1]. Within a document, for query i:
  out_i = sum_j softmax_j(scale * q_i . k_j) v_j   over keys j of the same document (j <= i if causal)
No token attends across documents. Same layout as flash-attn's varlen API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, softmax_scale=None):
    """One SDPA call per document (host loop over cu_seqlens)."""
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd = q[start:end].transpose(0, 1)
        kd = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        vd = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale)
        outs.append(od.transpose(0, 1))
    return torch.cat(outs, dim=0)


def check_varlen_args(q, k, v, cu_seqlens, max_seqlen):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D], k and v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [B+1]")
    if not isinstance(max_seqlen, int):
        raise TypeError("max_seqlen must be a Python int (taken from the host, so no device sync)")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, softmax_scale=None):
    """Attention within each packed document; see the module docstring. Returns [T, Hq, D]."""
    check_varlen_args(q, k, v, cu_seqlens, max_seqlen)
    return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)

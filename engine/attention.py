"""The attention implementations the engine can use (config key train.attention), all on the same
packed layout: q [T, Hq, D], k and v [T, Hkv, D], documents given by cu_seqlens, causal, with a
layer's sliding window (query i sees keys i - window < j <= i) and logit softcap when it has them.

  triton        lorafuse.kernels.varlen_attention (the default: "auto")
  flash_attn    flash-attn's flash_attn_varlen_func, when it is installed
  torch_varlen  torch.nn.attention.varlen.varlen_attn, where this torch has it (CUDA only)
  sdpa          one scaled_dot_product_attention call per document (the reference)

Each takes kv_again (varlen_attention.KVAgain: how to compute k and v again in backward); only triton uses it, the
others keep k and v as they always do.
"""

from __future__ import annotations

import importlib
import inspect

from lorafuse.kernels import varlen_attention
from lorafuse.kernels.varlen_attention import varlen_attention_reference

CHOICES = ("auto", "triton", "flash_attn", "torch_varlen", "sdpa")


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, scale, window=None, softcap=None, kv_again=None):
    from flash_attn import flash_attn_varlen_func

    # flash-attn counts the keys left of the query: window - 1 of them, plus the query itself
    window_size = (window - 1, 0) if window else (-1, -1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                  softmax_scale=scale, window_size=window_size, softcap=softcap or 0.0)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, window=None, softcap=None, kv_again=None):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if softcap:
        raise ValueError("train.attention=torch_varlen: torch.nn.attention.varlen has no logit softcapping (Gemma 2); "
                         "use triton")
    if window and "window_size" not in params:
        raise ValueError("train.attention=torch_varlen: this torch's varlen_attn has no sliding window; use triton")
    if "window_size" in params:
        causal = {"window_size": (window - 1 if window else -1, 0)}
    else:
        causal = {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" not in params:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        else:
            causal["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **causal)


def triton_attention(q, k, v, cu_seqlens, max_seqlen, scale, window=None, softcap=None, kv_again=None):
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=scale, window=window,
                            softcap=softcap, kv_again=kv_again)


def sdpa_attention(q, k, v, cu_seqlens, max_seqlen, scale, window=None, softcap=None, kv_again=None):
    """The reference: one SDPA call per document."""
    return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=scale,
                                      window=window, softcap=softcap)


def attention_function(name: str, device_type: str):
    """The attention callable for train.attention; a clear error when it cannot run here."""
    if name in ("auto", "triton"):
        return triton_attention
    if name == "sdpa":
        return sdpa_attention
    if device_type != "cuda":
        raise ValueError(f"train.attention={name} needs a CUDA GPU; use triton or sdpa on {device_type}")
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("train.attention=flash_attn: flash-attn is not installed (pip install 'lorafuse[flash]')")
        return _flash_attn
    if name == "torch_varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            raise ValueError("train.attention=torch_varlen: this torch has no torch.nn.attention.varlen")
        return _torch_varlen
    raise ValueError(f"train.attention must be one of {', '.join(CHOICES)}; got {name!r}")

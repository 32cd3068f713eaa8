"""The training forward of a Llama-family decoder over one packed micro-batch, on our kernels.

It reads the weights of the loaded HF model (LoRA-injected or not) and computes, for the flat
token stream of a PackedBatch:

  h = embed(input_ids)
  per layer:  x = rmsnorm(h);  q, k, v = x Wq, x Wk, x Wv   (Qwen3: rmsnorm of q and k per head)
              q, k = rope(q, k, position_ids)                 (positions restart per document)
              h = h + varlen_attention(q, k, v, cu_seqlens) Wo
              x = rmsnorm(h);  h = h + (silu(x Wg) * x Wu) Wd
  loss = cross_entropy(rmsnorm(h) Whead, labels)              (logits never materialised)

Llama, Mistral, Qwen2 and Qwen3 share this structure; model.SUPPORTED lists what differs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lorafuse.kernels import apply_rope, fused_linear_cross_entropy, rms_norm, swiglu, varlen_attention

from .model import model_spec
from .packing import IGNORE_INDEX, PackedBatch


def attention_block(layer, x: torch.Tensor, batch: PackedBatch, rope: tuple, spec: dict) -> torch.Tensor:
    attn = layer.self_attn
    tokens, head_dim = x.shape[0], spec["head_dim"]
    q = attn.q_proj(x).view(tokens, spec["num_heads"], head_dim)
    k = attn.k_proj(x).view(tokens, spec["num_kv_heads"], head_dim)
    v = attn.v_proj(x).view(tokens, spec["num_kv_heads"], head_dim)
    if spec["qk_norm"]:
        q = rms_norm(q, attn.q_norm.weight, spec["eps"])
        k = rms_norm(k, attn.k_norm.weight, spec["eps"])
    inv_freq, attention_scaling = rope
    q, k = apply_rope(q, k, batch.position_ids, inv_freq, attention_scaling)
    out = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal=True, softmax_scale=attn.scaling)
    return attn.o_proj(out.reshape(tokens, -1))


def mlp_block(layer, x: torch.Tensor) -> torch.Tensor:
    mlp = layer.mlp
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def decoder_layer(layer, hidden: torch.Tensor, batch: PackedBatch, rope: tuple, spec: dict) -> torch.Tensor:
    eps = spec["eps"]
    hidden = hidden + attention_block(layer, rms_norm(hidden, layer.input_layernorm.weight, eps), batch, rope, spec)
    return hidden + mlp_block(layer, rms_norm(hidden, layer.post_attention_layernorm.weight, eps))


def packed_hidden_states(model, batch: PackedBatch, checkpointing: str = "none") -> torch.Tensor:
    """Final-norm hidden states [T, hidden] of a packed micro-batch."""
    inner = model.model
    spec = model_spec(model)
    rope = (inner.rotary_emb.inv_freq, float(inner.rotary_emb.attention_scaling))
    hidden = inner.embed_tokens(batch.input_ids)
    for layer in inner.layers:
        if checkpointing == "recompute" and torch.is_grad_enabled():
            hidden = checkpoint(decoder_layer, layer, hidden, batch, rope, spec, use_reentrant=False)
        else:
            hidden = decoder_layer(layer, hidden, batch, rope, spec)
    return rms_norm(hidden, inner.norm.weight, spec["eps"])


def packed_loss(model, batch: PackedBatch, reduction: str = "sum", checkpointing: str = "none") -> torch.Tensor:
    """Cross-entropy over the batch's target tokens ("sum": the loop divides by the tokens of the
    whole accumulated step)."""
    hidden = packed_hidden_states(model, batch, checkpointing)
    head = model.lm_head
    return fused_linear_cross_entropy(hidden, head.weight, batch.labels, ignore_index=IGNORE_INDEX,
                                      reduction=reduction, bias=getattr(head, "bias", None))

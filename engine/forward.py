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

from lorafuse.kernels import (
    apply_rope,
    fused_linear_cross_entropy,
    lora_linear_group,
    lora_mlp,
    rms_norm,
    swiglu,
)

from .attention import triton_attention
from .lora import LoraLinear
from .model import model_spec
from .packing import IGNORE_INDEX, PackedBatch


def _adapter(proj, x: torch.Tensor) -> tuple:
    """(lora_a, lora_b, scaling) of a projection in x's dtype; (None, None, 0.0) if it has none."""
    if isinstance(proj, LoraLinear) and proj.enabled:
        return proj.lora_A.to(x.dtype), proj.lora_B.to(x.dtype), proj.scaling
    return None, None, 0.0


def _fusable(block, projs) -> bool:
    """The grouped kernels need the stacked weights (model.stack_projections) and no LoRA dropout
    (dropout feeds only the low-rank branch, which the fused kernels cannot do)."""
    return getattr(block, "lorafuse_stacked", None) is not None and not any(
        isinstance(p, LoraLinear) and p.enabled and p.dropout > 0 and p.training for p in projs)


def project(block, x: torch.Tensor, names: tuple) -> tuple:
    """The projections `names` of one input, one read of x when their weights are stacked."""
    projs = [getattr(block, n) for n in names]
    if not _fusable(block, projs):
        return tuple(p(x) for p in projs)
    weight, bias = block.lorafuse_stacked
    lora_as, lora_bs, scalings = zip(*(_adapter(p, x) for p in projs))
    return lora_linear_group(x, weight, list(lora_as), list(lora_bs), list(scalings),
                             [p.out_features for p in projs], bias=bias)


def attention_block(layer, x: torch.Tensor, batch: PackedBatch, rope: tuple, spec: dict) -> torch.Tensor:
    """The attention half of a decoder layer; spec["attend"] is the attention implementation."""
    attn = layer.self_attn
    tokens, head_dim = x.shape[0], spec["head_dim"]
    q, k, v = project(attn, x, ("q_proj", "k_proj", "v_proj"))
    q = q.view(tokens, spec["num_heads"], head_dim)
    k = k.view(tokens, spec["num_kv_heads"], head_dim)
    v = v.view(tokens, spec["num_kv_heads"], head_dim)
    if spec["qk_norm"]:
        q = rms_norm(q, attn.q_norm.weight, spec["eps"])
        k = rms_norm(k, attn.k_norm.weight, spec["eps"])
    inv_freq, attention_scaling = rope
    q, k = apply_rope(q, k, batch.position_ids, inv_freq, attention_scaling)
    out = spec["attend"](q, k, v, batch.cu_seqlens, batch.max_seqlen, attn.scaling)
    return attn.o_proj(out.reshape(tokens, -1))


def mlp_block(layer, x: torch.Tensor) -> torch.Tensor:
    mlp = layer.mlp
    projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if _fusable(mlp, projs) and mlp.down_proj.bias is None and mlp.lorafuse_stacked[1] is None:
        # SwiGLU fused into the projections; its activation is recomputed in backward, not stored
        return lora_mlp(x, mlp.lorafuse_stacked[0], *_adapter(mlp.gate_proj, x), *_adapter(mlp.up_proj, x),
                        mlp.down_proj.weight, *_adapter(mlp.down_proj, x))
    gate, up = project(mlp, x, ("gate_proj", "up_proj"))
    return mlp.down_proj(swiglu(gate, up))


def decoder_layer(hidden: torch.Tensor, layer, batch: PackedBatch, rope: tuple, spec: dict) -> torch.Tensor:
    eps = spec["eps"]
    hidden = hidden + attention_block(layer, rms_norm(hidden, layer.input_layernorm.weight, eps), batch, rope, spec)
    return hidden + mlp_block(layer, rms_norm(hidden, layer.post_attention_layernorm.weight, eps))


def packed_hidden_states(model, batch: PackedBatch, checkpointer=None) -> torch.Tensor:
    """Final-norm hidden states [T, hidden] of a packed micro-batch. With a LayerCheckpointer
    (checkpointing.py) each decoder layer runs under its mode: keep, recompute or offload."""
    inner = model.model
    spec = model_spec(model)
    spec["attend"] = getattr(model, "lorafuse_attention", None) or triton_attention
    rope = (inner.rotary_emb.inv_freq, float(inner.rotary_emb.attention_scaling))
    hidden = inner.embed_tokens(batch.input_ids)
    for i, layer in enumerate(inner.layers):
        if checkpointer is None:
            hidden = decoder_layer(hidden, layer, batch, rope, spec)
        else:
            hidden = checkpointer.checkpoint(i, decoder_layer, hidden, layer, batch, rope, spec)
    return rms_norm(hidden, inner.norm.weight, spec["eps"])


def packed_loss(model, batch: PackedBatch, reduction: str = "sum", checkpointer=None) -> torch.Tensor:
    """Cross-entropy over the batch's target tokens ("sum": the loop divides by the tokens of the
    whole accumulated step)."""
    hidden = packed_hidden_states(model, batch, checkpointer)
    head = model.lm_head
    return fused_linear_cross_entropy(hidden, head.weight, batch.labels, ignore_index=IGNORE_INDEX,
                                      reduction=reduction, bias=getattr(head, "bias", None))

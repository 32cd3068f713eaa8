"""The training forward of a Llama-family decoder over one packed micro-batch, on our kernels.

Everything it reads comes in its arguments: the PreparedModel (prepare.py: decoder numbers,
kernel ops, attention function, per-layer modules and stacked weights) and the PackedBatch. For
the flat token stream of the batch it computes:

  h = embed(input_ids)
  per layer:  x = rmsnorm(h);  q, k, v = x Wq, x Wk, x Wv   (Qwen3: rmsnorm of q and k per head)
              q, k = rope(q, k, position_ids)                 (positions restart per document)
              h = h + varlen_attention(q, k, v, cu_seqlens) Wo
              x = rmsnorm(h);  h = h + (silu(x Wg) * x Wu) Wd
  loss = cross_entropy(rmsnorm(h) Whead, labels)              (logits never materialised)

Each W is a frozen weight plus its LoRA adapter, computed by lora.lora_projections. Llama,
Mistral, Qwen2 and Qwen3 share this structure; model.SUPPORTED lists what differs.
"""

from __future__ import annotations

import torch

from .lora import adapter_args, fusable, lora_projections
from .packing import IGNORE_INDEX, PackedBatch
from .prepare import PreparedLayer, PreparedModel


def attention_block(x: torch.Tensor, layer: PreparedLayer, batch: PackedBatch, prepared: PreparedModel) -> torch.Tensor:
    """The attention half of a decoder layer, from its normalised input."""
    attn, spec, ops = layer.module.self_attn, prepared.spec, prepared.ops
    tokens = x.shape[0]
    q, k, v = lora_projections(x, (attn.q_proj, attn.k_proj, attn.v_proj), layer.qkv, ops)
    q = q.view(tokens, spec.num_heads, spec.head_dim)
    k = k.view(tokens, spec.num_kv_heads, spec.head_dim)
    v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm:
        q = ops.rms_norm(q, attn.q_norm.weight, spec.eps)
        k = ops.rms_norm(k, attn.k_norm.weight, spec.eps)
    rotary = prepared.model.model.rotary_emb
    q, k = ops.apply_rope(q, k, batch.position_ids, rotary.inv_freq, float(rotary.attention_scaling))
    out = prepared.attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, attn.scaling)
    return lora_projections(out.reshape(tokens, -1), (attn.o_proj,), None, ops)[0]


def mlp_block(x: torch.Tensor, layer: PreparedLayer, prepared: PreparedModel) -> torch.Tensor:
    mlp, ops = layer.module.mlp, prepared.ops
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    stacked = layer.gate_up
    if stacked is not None and stacked.bias is None and down.bias is None and all(map(fusable, (gate, up, down))):
        # SwiGLU fused into the projections; its activation is recomputed in backward, not stored
        return ops.lora_mlp(x, stacked.weight, *adapter_args(gate, x), *adapter_args(up, x), down.weight,
                            *adapter_args(down, x))
    g, u = lora_projections(x, (gate, up), stacked, ops)
    return lora_projections(ops.swiglu(g, u), (down,), None, ops)[0]


def decoder_layer(hidden: torch.Tensor, layer: PreparedLayer, batch: PackedBatch,
                  prepared: PreparedModel) -> torch.Tensor:
    module, ops, eps = layer.module, prepared.ops, prepared.spec.eps
    hidden = hidden + attention_block(ops.rms_norm(hidden, module.input_layernorm.weight, eps), layer, batch, prepared)
    return hidden + mlp_block(ops.rms_norm(hidden, module.post_attention_layernorm.weight, eps), layer, prepared)


def packed_hidden_states(prepared: PreparedModel, batch: PackedBatch, checkpointer=None) -> torch.Tensor:
    """Final-norm hidden states [T, hidden] of a packed micro-batch. With a LayerCheckpointer
    (activations/) each decoder layer runs under its mode: keep, recompute or offload."""
    inner = prepared.model.model
    hidden = inner.embed_tokens(batch.input_ids)
    for i, layer in enumerate(prepared.layers):
        if checkpointer is None:
            hidden = decoder_layer(hidden, layer, batch, prepared)
        else:
            hidden = checkpointer.checkpoint(i, decoder_layer, hidden, layer, batch, prepared)
    return prepared.ops.rms_norm(hidden, inner.norm.weight, prepared.spec.eps)


def packed_loss(prepared: PreparedModel, batch: PackedBatch, reduction: str = "sum", checkpointer=None) -> torch.Tensor:
    """Cross-entropy over the batch's target tokens ("sum": the loop divides by the tokens of the
    whole accumulated step)."""
    hidden = packed_hidden_states(prepared, batch, checkpointer)
    head = prepared.model.lm_head
    return prepared.ops.linear_cross_entropy(hidden, head.weight, batch.labels, ignore_index=IGNORE_INDEX,
                                             reduction=reduction, bias=getattr(head, "bias", None))

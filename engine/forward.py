"""The training forward of a Llama-family decoder over one packed micro-batch, on our kernels.

Everything it reads comes in its arguments: the PreparedModel (prepare.py: decoder numbers,
kernel ops, attention function, per-layer modules and stacked weights) and the PackedBatch. For
the flat token stream of the batch it computes:

  h = embed(input_ids)
  per layer:  x = rmsnorm(h);  q, k, v = x Wq, x Wk, x Wv   (Qwen3: rmsnorm of q and k per head)
              q, k = rope(q, k, position_ids)                 (positions restart per document)
              h = h + varlen_attention(q, k, v, cu_seqlens) Wo   (k, v computed again in its backward)
              x = rmsnorm(h);  h = h + (silu(x Wg) * x Wu) Wd
  loss = cross_entropy(rmsnorm(h) Whead, labels)              (logits never materialised)

Each W is a frozen weight plus its LoRA adapter, computed by lora.lora_projections. Llama,
Mistral, Qwen2 and Qwen3 share this structure; model.SUPPORTED lists what differs.
"""

from __future__ import annotations

import torch

from lorafuse.kernels.nf4 import is_nf4
from lorafuse.kernels.rms_norm import NormedInput
from lorafuse.kernels.rope import rope_values
from lorafuse.kernels.varlen_attention import KVAgain

from .attention import triton_attention
from .lora import adapter_args, fusable, lora_projections
from .packing import IGNORE_INDEX, PackedBatch
from .prepare import PreparedLayer, PreparedModel, Stacked


def attention_block(x: torch.Tensor, layer: PreparedLayer, batch: PackedBatch, prepared: PreparedModel,
                    qkv: tuple | None = None, project=None, normed_from: NormedInput | None = None) -> torch.Tensor:
    """The attention half of a decoder layer, from its normalised input x (normed_from: the norm's input and
    weight, which the q/k/v projections keep instead of x) or from its q, k, v and the o_proj function given
    (lora_gemm.py's cuBLAS layer)."""
    attn, spec, ops = layer.module.self_attn, prepared.spec, prepared.ops
    tokens = (x if qkv is None else qkv[0]).shape[0]
    q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if qkv is not None:
        q, k, v = qkv
    elif spec.family.fused_qkv:  # Phi-3: one projection (and one adapter) for q, k and v
        q, k, v = lora_projections(x, (attn.qkv_proj,), None, ops)[0].split([q_width, kv_width, kv_width], -1)
    else:
        q, k, v = lora_projections(x, (attn.q_proj, attn.k_proj, attn.v_proj), layer.qkv, ops, normed_from)
    q = q.view(tokens, spec.num_heads, spec.head_dim)
    k = k.view(tokens, spec.num_kv_heads, spec.head_dim)
    v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
    if spec.family.qk_norm:
        q = ops.rms_norm(q, attn.q_norm.weight, spec.eps, spec.family.norm_offset)
        k = ops.rms_norm(k, attn.k_norm.weight, spec.eps, spec.family.norm_offset)
    # v is copied by the same launch: attention then keeps q, k and v, not the fused q/k/v buffer v would be a view of
    q, k, v = ops.apply_rope(q, k, batch.position_ids, layer.inv_freq, layer.rope_scaling, v=v)
    again = keys_and_values_again(layer, batch, prepared, normed_from) if qkv is None else None
    out = prepared.attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, layer.softmax_scale, window=layer.window,
                             softcap=layer.softcap, kv_again=again)
    if project is not None:
        return project(out.reshape(tokens, -1))
    return lora_projections(out.reshape(tokens, -1), (attn.o_proj,), None, ops)[0]


def keys_and_values_again(layer: PreparedLayer, batch: PackedBatch, prepared: PreparedModel,
                          normed_from: NormedInput | None) -> KVAgain | None:
    """How our attention kernel computes k and v again in its backward instead of keeping them: from the layer's
    input h, which its norm keeps anyway (x = rmsnorm(h); k, v = x Wk, x Wv; k = rope(k)). At Llama-3.1-8B that
    keeps 4 KB per token per layer less (a quarter of what attention kept) for one [T, hidden] x [hidden, 2 Hkv D]
    GEMM more (its time not measured yet: no GPU run so far). The rebuilt x is left for the q/k/v projection's
    backward, which comes next and reads it too. None where attention keeps k and v: another attention
    implementation, q, k and v not computed by one grouped kernel from a norm's output, or NF4 weights."""
    attn, spec, ops = layer.module.self_attn, prepared.spec, prepared.ops
    projs = (attn.q_proj, attn.k_proj, attn.v_proj) if not spec.family.fused_qkv else ()
    # an NF4 stack has no row slice that is a view: QLoRA keeps k and v
    if (prepared.attention is not triton_attention or normed_from is None or layer.qkv is None or not projs
            or is_nf4(layer.qkv.weight) or not all(map(fusable, projs))):
        return None
    q_width = spec.num_heads * spec.head_dim
    kv = Stacked(layer.qkv.weight[q_width:], layer.qkv.bias[q_width:] if layer.qkv.bias is not None else None)
    keep_x = any(adapter_args(p)[0] is not None for p in projs)  # the q/k/v backward then reads x (dA)
    normed = normed_from._replace(h=None)  # h comes back through the saved inputs, not held here

    def again(h, position_ids):
        x = normed.values(h, keep=keep_x)
        k, v = (t.view(h.shape[0], spec.num_kv_heads, spec.head_dim) for t in lora_projections(x, projs[1:], kv, ops))
        if spec.family.qk_norm:
            k = ops.rms_norm(k, attn.k_norm.weight, spec.eps, spec.family.norm_offset)
        return rope_values(k, position_ids, layer.inv_freq, layer.rope_scaling), v

    return KVAgain(again, (normed_from.h, batch.position_ids))


def mlp_block(x: torch.Tensor, layer: PreparedLayer, prepared: PreparedModel,
              normed_from: NormedInput | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) (+ residual), act SiLU (SwiGLU) or tanh-GELU (Gemma's GeGLU); normed_from as
    in attention_block. The fused kernel adds the residual in its last GEMM; the other paths add it after."""
    mlp, ops, spec = layer.module.mlp, prepared.ops, prepared.spec
    down = mlp.down_proj
    if spec.family.fused_qkv:  # Phi-3: gate and up are one projection with one adapter
        gate_up, weight = (mlp.gate_up_proj,), mlp.gate_up_proj.weight
    else:
        gate_up = (mlp.gate_proj, mlp.up_proj)
        weight = layer.gate_up.weight if layer.gate_up is not None and layer.gate_up.bias is None else None
    if weight is not None and down.bias is None and all(map(fusable, (*gate_up, down))):
        # the activation is fused into the projections; recomputed in backward, not stored
        return ops.lora_mlp(x, weight, *_gate_and_up_adapters(gate_up, spec.intermediate_size), down.weight,
                            *adapter_args(down), activation=spec.activation, normed_from=normed_from,
                            residual=residual)
    if len(gate_up) == 1:
        g, u = lora_projections(x, gate_up, None, ops)[0].chunk(2, -1)
    else:
        g, u = lora_projections(x, gate_up, layer.gate_up, ops, normed_from)
    glu = ops.swiglu if spec.activation == "silu" else ops.geglu
    out = lora_projections(glu(g, u), (down,), None, ops)[0]
    return out if residual is None else residual + out


def _gate_and_up_adapters(gate_up: tuple, intermediate: int) -> tuple:
    """(a, b, s) of the gate, then of up; one fused gate_up adapter splits into both: its A shared, its B
    by rows (x A^T is then computed twice, the price of reusing the two-adapter kernel)."""
    if len(gate_up) == 2:
        return (*adapter_args(gate_up[0]), *adapter_args(gate_up[1]))
    a, b, s = adapter_args(gate_up[0])
    if a is None:
        return (None, None, 0.0) * 2
    return a, b[:intermediate], s, a, b[intermediate:], s


def decoder_layer(hidden: torch.Tensor, layer: PreparedLayer, batch: PackedBatch,
                  prepared: PreparedModel) -> torch.Tensor:
    if prepared.lora_gemm is not None and prepared.lora_gemm.runs(layer):  # cuBLAS GEMMs (lora_gemm.py)
        return prepared.lora_gemm.decoder_layer(hidden, layer, batch, prepared)
    module, ops, spec = layer.module, prepared.ops, prepared.spec
    norm = lambda t, weight: ops.rms_norm(t, weight, spec.eps, spec.family.norm_offset)  # noqa: E731
    # the projections of a norm's output keep the norm's input (kept by the norm anyway), not the output
    normed_from = lambda t, weight: NormedInput(t, weight, spec.eps, spec.family.norm_offset, {})  # noqa: E731
    weight = module.input_layernorm.weight
    # the residual path reads the hidden the norm hands back: both gradients meet in the norm's backward kernel
    normed, hidden = ops.rms_norm_branch(hidden, weight, spec.eps, spec.family.norm_offset)
    attended = attention_block(normed, layer, batch, prepared, normed_from=normed_from(hidden, weight))
    if not spec.family.sandwich_norms:
        # the residual add and the norm in one kernel: one launch less, and h is read once
        weight = module.post_attention_layernorm.weight
        normed, hidden = ops.rms_norm_residual(attended, hidden, weight, spec.eps, spec.family.norm_offset)
        return mlp_block(normed, layer, prepared, normed_from(hidden, weight), residual=hidden)
    # Gemma 2/3: each half's output is normalised before it joins the residual stream
    hidden = hidden + norm(attended, module.post_attention_layernorm.weight)
    weight = module.pre_feedforward_layernorm.weight
    mixed = mlp_block(norm(hidden, weight), layer, prepared, normed_from(hidden, weight))
    return hidden + norm(mixed, module.post_feedforward_layernorm.weight)


def packed_hidden_states(prepared: PreparedModel, batch: PackedBatch, checkpointer=None) -> torch.Tensor:
    """Final-norm hidden states [T, hidden] of a packed micro-batch. With a LayerCheckpointer
    (activations/) each decoder layer runs under its mode: keep, recompute or offload."""
    inner = prepared.model.model
    hidden = inner.embed_tokens(batch.input_ids)  # Gemma's embedding module scales by sqrt(hidden) itself
    for i, layer in enumerate(prepared.layers):
        # sharded (fsdp): the layer's FSDP module gathers its weights, then runs decoder_layer
        run = prepared.sharded.layers[i] if prepared.sharded is not None else decoder_layer
        if checkpointer is None:
            hidden = run(hidden, layer, batch, prepared)
        else:
            hidden = checkpointer.checkpoint(i, run, hidden, layer, batch, prepared)
    return prepared.ops.rms_norm(hidden, inner.norm.weight, prepared.spec.eps, prepared.spec.family.norm_offset)


def packed_loss(prepared: PreparedModel, batch: PackedBatch, reduction: str = "sum", checkpointer=None,
                ) -> torch.Tensor:
    """Cross-entropy over the batch's target tokens ("sum": the loop divides by the tokens of the
    whole accumulated step)."""
    if prepared.sharded is not None:  # the FSDP root gathers the embeddings and head, then runs the loss
        return prepared.sharded(prepared, batch, reduction, checkpointer)
    return unsharded_loss(prepared, batch, reduction, checkpointer)


def unsharded_loss(prepared: PreparedModel, batch: PackedBatch, reduction: str = "sum", checkpointer=None,
                   ) -> torch.Tensor:
    hidden = packed_hidden_states(prepared, batch, checkpointer)
    head = prepared.model.lm_head
    return prepared.ops.linear_cross_entropy(hidden, head.weight, batch.labels, ignore_index=IGNORE_INDEX,
                                             reduction=reduction, bias=getattr(head, "bias", None),
                                             softcap=prepared.spec.final_softcap)

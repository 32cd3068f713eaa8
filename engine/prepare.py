"""From a loaded HF model to what our training forward runs: one explicit step, made once.

    prepared = prepare_model(model, attention="auto", kernels="auto")
    loss = packed_loss(prepared, batch)          # forward.py reads everything from `prepared`

A PreparedModel holds the model's decoder numbers (DecoderSpec), the attention function, the
kernel ops, and per layer its module and stacked frozen weights. Nothing is planted on the HF
modules and no process-wide setting is written, so every input of a forward is in its arguments.

Stacking: each layer's q/k/v and gate/up frozen weights are copied once into one tensor each and
the projections' weights become views of it, so the grouped kernels read the layer input once for
all of them with no copy per step. It works before or after LoRA injection (a LoraLinear keeps its
base weight as `weight`, like nn.Linear; a PEFT LoRA layer as `base_layer.weight`). The stacked
weights are not parameters: a model whose projections train in full (the demo's pre-training) is
prepared with stack_projections=False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafuse.kernels.nf4 import is_nf4, stack_nf4

from .attention import attention_function, sdpa_attention
from .lora_gemm import lora_gemm_for
from .model import ACTIVATIONS, SUPPORTED, Family, ModelError, layer_window
from .ops import KernelOps, kernel_ops

STACKED_GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class DecoderSpec:
    """The numbers of a decoder that the packed forward needs, the same for every layer."""

    model_type: str
    family: Family  # model.SUPPORTED: what differs from Llama
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    eps: float
    activation: str  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    final_softcap: float | None  # Gemma 2: logits become c * tanh(logits / c)

    @classmethod
    def from_config(cls, config) -> DecoderSpec:
        if config.model_type not in SUPPORTED:
            raise ModelError(f"model_type {config.model_type!r} is not supported; lorafuse trains "
                             f"{', '.join(sorted(SUPPORTED))}")
        family = SUPPORTED[config.model_type]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        act = getattr(config, family.activation_key, None) or getattr(config, "hidden_act", None) or "silu"
        return cls(model_type=config.model_type, family=family, num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads, head_dim=head_dim, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, eps=config.rms_norm_eps, activation=ACTIVATIONS[act],
                   final_softcap=getattr(config, "final_logit_softcapping", None))


@dataclass(frozen=True)
class Stacked:
    """Frozen weights of several projections of one input, stacked by rows: [sum of out, in]."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class PreparedLayer:
    module: torch.nn.Module  # the HF decoder layer: its norms and projections hold the weights
    qkv: Stacked | None  # None: q, k and v run one by one (Phi-3: its one qkv_proj)
    gate_up: Stacked | None
    window: int | None  # sliding window (keys i - window < j <= i), None: full causal attention
    inv_freq: torch.Tensor  # RoPE frequencies of this layer (Gemma 3: local and global layers differ)
    rope_scaling: float  # HF's attention_scaling of cos and sin
    softmax_scale: float
    softcap: float | None  # Gemma 2: attention logits become c * tanh(s / c)


@dataclass(frozen=True)
class PreparedModel:
    model: torch.nn.Module
    spec: DecoderSpec
    layers: tuple[PreparedLayer, ...]
    attention: Callable  # (q, k, v, cu_seqlens, max_seqlen, scale, window, softcap) -> out; attention.py
    ops: KernelOps
    device: torch.device
    sharded: torch.nn.Module | None = None  # train.parallel: fsdp: the FSDP2 modules that run it (sharding.py)
    lora_gemm: object | None = None  # lora_gemm.LoraGemm: the LoRA GEMM path (train.lora_gemm) and its buffers


def prepare_model(model, *, attention: str = "auto", kernels: str = "auto",
                  stack_projections: bool = True, lora_gemm: str = "auto") -> PreparedModel:
    """The PreparedModel of a loaded model (attention: train.attention, kernels: train.kernels, lora_gemm:
    train.lora_gemm)."""
    config = model.config
    spec = DecoderSpec.from_config(config)
    device = next(model.parameters()).device
    ops = kernel_ops(kernels)
    attend = attention_function(attention, device.type)
    if ops.name == "reference" and attention in ("auto", "triton"):
        attend = sdpa_attention  # the reference of our attention kernel
    stack = stack_projections and not spec.family.fused_qkv  # Phi-3's checkpoint is stacked already
    rotary = model.model.rotary_emb
    layers = []
    for i, layer in enumerate(model.model.layers):
        layer_type = (getattr(config, "layer_types", None) or [None] * (i + 1))[i]
        # Gemma 3 keeps one set of RoPE frequencies per layer type, the others one for all layers
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        rope_scaling = getattr(rotary, f"{layer_type}_attention_scaling", None) if layer_type else None
        groups = {block: _stack(getattr(layer, block), names) if stack else None
                  for block, names in STACKED_GROUPS.items()}
        layers.append(PreparedLayer(
            module=layer, qkv=groups["self_attn"], gate_up=groups["mlp"], window=layer_window(config, i),
            inv_freq=inv_freq if inv_freq is not None else rotary.inv_freq,
            rope_scaling=float(rope_scaling if rope_scaling is not None else rotary.attention_scaling),
            softmax_scale=float(layer.self_attn.scaling),
            softcap=getattr(layer.self_attn, "attn_logit_softcapping", None)))
    gemm = lora_gemm_for(model, lora_gemm, device, spec, kernels)
    return PreparedModel(model=model, spec=spec, layers=tuple(layers), attention=attend, ops=gemm.wrap_ops(ops),
                         device=device, lora_gemm=gemm)


def _stack(block, names: tuple[str, ...]) -> Stacked | None:
    """Stack the frozen weights of block's projections `names`; None when some have a bias and some not."""
    mods = [getattr(block, n) for n in names]
    if any(m.bias is None for m in mods) and any(m.bias is not None for m in mods):
        return None
    quantized = [is_nf4(m.weight) for m in mods]
    if any(quantized):  # QLoRA: one NF4Weight whose buffers the parts' become views of, when their blocks line up
        weight = stack_nf4([m.weight for m in mods]) if all(quantized) else None
        if weight is None:
            return None
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        _share(mods, None, bias)
        return Stacked(weight, bias)
    weight = torch.cat([m.weight.detach() for m in mods])
    bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
    _share(mods, weight, bias)
    return Stacked(weight, bias)


def _share(mods, weight, bias) -> None:
    """Make the projections' weights (unless None) and biases views of the stacked ones."""
    start = 0
    for m in mods:
        end = start + m.out_features
        # The same Parameter objects, their data now views of the stack, so whatever refers to them still
        # does (a PEFT layer's base_layer; patch.py's unpatch gives them their own storage back).
        base = getattr(m, "base_layer", m)
        if weight is not None:
            base.weight.data = weight[start:end]
        if bias is not None:
            base.bias.data = bias[start:end]
        start = end

"""What each decoder layer keeps for backward: the per-layer modes of a run, the memory planner
that fits them to a budget, and the activation sizes it plans with.

Memory model of the planner (plan_checkpointing), for T tokens, K = T * bytes a kept layer saves
per token, I = T * bytes of the layer input per token. While layer j runs backward, the device
holds what the layers below j keep (K for "none", I for "recompute", 0 for "offload"), layer j's
own (K for "none"; its input plus its recomputed activations, I + K, otherwise), and one
prefetched input (I) when an offloaded layer is below j. The peak is the largest of these over j
(j = n-1 is the end of forward). Keeping the top layers and offloading the bottom ones is best:
kept activations are freed before the layers below are recomputed, and the bottom inputs are
needed last, which leaves the most time to bring them back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..distributed import local
from .arena import HOST_SHARE, default_host_limit
from .checkpointer import DEFAULT_MIN_OFFLOAD_BYTES, MODES, LayerCheckpointer

logger = logging.getLogger(__name__)
LOSS_WORKSPACE_BYTES = 256 * 2**20  # the fused loss's chunk of logits, besides its [T, hidden] gradient


def make_checkpointer(model, cfg, dtype: torch.dtype, device: torch.device, log,
                      sharded=None) -> LayerCheckpointer | None:
    """The run's per-layer policy: train.checkpointing for every layer, or, with train.memory_budget_gb,
    keep / recompute / offload chosen per layer to fit the budget. None when every layer keeps all.
    sharded: the FSDP modules of train.parallel: fsdp, whose shards are what a rank holds."""
    t = cfg.train
    if t.checkpointing == "none" and t.memory_budget_gb <= 0:
        return None
    n_layers = model.config.num_hidden_layers
    if t.memory_budget_gb > 0:
        modes = plan_for_model(model, t.memory_budget_gb * 2**30, t.max_tokens_per_step, dtype,
                               lora_rank=cfg.lora.r, lora_projections=len(cfg.lora.target_modules), sharded=sharded)
        counts = {m: modes.count(m) for m in MODES}
        log(f"[memory] budget {t.memory_budget_gb:g} GB: keep {counts['none']}, recompute {counts['recompute']}, "
            f"offload {counts['offload']} of {n_layers} layers")
    else:
        modes = layer_modes(t.checkpointing, n_layers)
    host_limit = default_host_limit()
    checkpointer = LayerCheckpointer(device, modes, max_host_bytes=host_limit)
    if "offload" in modes:
        log(f"[memory] offload backend: {checkpointer.backend}, pinned host memory up to {host_limit / 2**30:.1f} GiB "
            f"({HOST_SHARE:.0%} of the free host memory)")
    return checkpointer


def plan_for_model(model, budget_bytes: float, tokens: int, dtype: torch.dtype, *, lora_rank: int,
                   lora_projections: int, sharded=None) -> list[str]:
    """plan_checkpointing for a loaded LoRA model: the device budget less what is not activations
    (resident_bytes: weights, LoRA state, the loss workspace)."""
    kept, layer_input = layer_bytes_per_token(model, dtype, lora_rank=lora_rank,
                                              lora_projections=lora_projections)
    activations = budget_bytes - sum(resident_bytes(model, tokens, dtype, sharded=sharded).values())
    return plan_checkpointing(model.config.num_hidden_layers, kept, layer_input, tokens, activations)


def resident_bytes(model, tokens: int, dtype: torch.dtype, sharded=None) -> dict[str, int]:
    """Device memory of a LoRA model's step besides the activations the layers keep: its frozen weights (NF4 ones
    as stored, with the dense buffer one of them is dequantized into; sharded, this rank's shards), the
    LoRA parameters' float32 masters, gradients and two Adam moments plus the guard's copy of masters and
    moments (guard.LastGood), and the loss workspace: the fused loss's chunk of logits (at most
    LOSS_WORKSPACE_BYTES, never more than all T x vocab of them) and the [T, hidden] normalised hidden states
    and their gradient."""
    c = model.config
    item = torch.empty((), dtype=dtype).element_size()
    if sharded is not None:  # each rank's shards, and whole: the layer computing and the next one arriving
        params = list(sharded.parameters())
        weights = sum(local(p).numel() * p.element_size() for p in params if not p.requires_grad)
        weights += 2 * sum(p.numel() * p.element_size() for p in sharded.layers[0].parameters())
        lora = sum(local(p).numel() for p in params if p.requires_grad) * 4 * (4 + 3)
    else:
        from ..quantize import dequantize_workspace_bytes, frozen_weight_bytes

        # NF4 weights as stored, plus the dense copy of the largest one while its GEMMs run
        weights = frozen_weight_bytes(model) + dequantize_workspace_bytes(model, dtype)
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * (4 + 3)
    loss_workspace = min(LOSS_WORKSPACE_BYTES, tokens * c.vocab_size * item) + tokens * c.hidden_size * item * 2
    return {"weights": weights, "lora": lora, "loss_workspace": loss_workspace}


def layer_bytes_per_token(model, dtype: torch.dtype, *, lora_rank: int, lora_projections: int) -> tuple[int, int]:
    """(bytes a kept decoder layer saves per token, bytes of a layer's input per token) for a HF model (loaded,
    or built on the meta device). Its attention keeps k and v where the engine cannot compute them again
    (forward.keys_and_values_again): Phi-3's one q/k/v projection, and NF4 (QLoRA) q/k/v weights."""
    from ..model import SUPPORTED
    from ..quantize import quantized_weights

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    family = SUPPORTED.get(getattr(c, "model_type", None))
    keeps_kv = (family is not None and "qkv_proj" in family.projections) or bool(quantized_weights(model))
    kept = llama_layer_bytes_per_token(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                       c.num_key_value_heads, head_dim=head_dim, dtype=dtype, lora_rank=lora_rank,
                                       lora_projections=lora_projections, keeps_kv=keeps_kv)
    return kept, c.hidden_size * torch.empty((), dtype=dtype).element_size()


def layer_modes(setting: str, n_layers: int) -> list[str]:
    """Per-layer modes for one config value (train.checkpointing): "none" and "recompute" apply to
    every layer; "offload" to every layer but the last, which recomputes (its input is needed first
    in backward, so offloading it would only add a copy and a wait)."""
    if setting not in MODES:
        raise ValueError(f"checkpointing must be one of {MODES}, got {setting!r}")
    if setting == "offload":
        return ["offload"] * (n_layers - 1) + ["recompute"] * min(n_layers, 1)
    return [setting] * n_layers


def estimate_peak_bytes(modes: Sequence[str], bytes_per_token_per_layer_kept: float,
                        bytes_per_token_layer_input: float, tokens: int) -> float:
    """Peak activation bytes of one forward+backward under `modes` (the module docstring's model)."""
    kept = bytes_per_token_per_layer_kept * tokens
    layer_input = bytes_per_token_layer_input * tokens
    resident = {"none": kept, "recompute": layer_input, "offload": 0.0}
    below = 0.0  # what the layers below j keep
    offloaded_below = False
    peak = 0.0
    for mode in modes:
        own = kept if mode == "none" else layer_input + kept
        peak = max(peak, below + own + (layer_input if offloaded_below else 0.0))
        below += resident[mode]
        offloaded_below = offloaded_below or mode == "offload"
    return peak


def plan_checkpointing(n_layers: int, bytes_per_token_per_layer_kept: float,
                       bytes_per_token_layer_input: float, tokens: int, budget_bytes: float, *,
                       min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES) -> list[str]:
    """A mode per layer ("none" = keep, "recompute", "offload") whose peak fits budget_bytes.

    budget_bytes is what activations may use: the caller subtracts weights, LoRA and optimizer
    state, and the loss workspace from the device memory it allows. Layout: offloaded layers at
    the bottom, recomputed ones in the middle, kept ones at the top (see the module docstring).
    The plan keeps as many layers as fit, then recomputes as many as fit, then offloads the rest;
    the last layer is never offloaded (its input is needed first in backward), nor is an input
    under min_offload_bytes. When nothing fits it returns the plan with the smallest peak and logs
    a warning with that peak.
    """
    kept_bytes, input_bytes = bytes_per_token_per_layer_kept, bytes_per_token_layer_input
    if n_layers <= 0:
        return []
    if tokens <= 0:
        return ["none"] * n_layers
    may_offload = bytes_per_token_layer_input * tokens >= min_offload_bytes
    best: tuple[float, list[str]] | None = None
    for n_keep in range(n_layers, -1, -1):
        max_offload = min(n_layers - n_keep, n_layers - 1) if may_offload else 0
        for n_offload in range(max_offload + 1):
            n_recompute = n_layers - n_keep - n_offload
            modes = ["offload"] * n_offload + ["recompute"] * n_recompute + ["none"] * n_keep
            peak = estimate_peak_bytes(modes, kept_bytes, input_bytes, tokens)
            if peak <= budget_bytes:
                return modes
            if best is None or peak < best[0]:
                best = (peak, modes)
    assert best is not None
    logger.warning("lorafuse: activations need at least %.2f GiB at %d tokens, more than the budget of "
                   "%.2f GiB; using the plan with the smallest peak",
                   best[0] / 2**30, tokens, budget_bytes / 2**30)
    return best[1]


def llama_layer_bytes_per_token(hidden_size: int, intermediate_size: int, num_heads: int,
                                num_kv_heads: int | None = None, *, head_dim: int | None = None,
                                dtype: torch.dtype = torch.bfloat16, lora_rank: int = 16,
                                lora_projections: int = 7, keeps_kv: bool = False) -> int:
    """Bytes per token that one kept Llama-family decoder layer saves for backward with lorafuse's
    fused kernels (RMSNorm, RoPE, varlen attention, SwiGLU, LoRA linears with dropout 0).

    Saved, in `dtype` per token: the layer input and the post-attention residual (RMSNorm inputs; the
    normalised activations, inputs of q/k/v and of gate/up, are rebuilt from them in backward, not kept:
    rms_norm.NormedInput), q after RoPE (k and v are computed again from the layer input in attention's
    backward: forward.keys_and_values_again; keeps_kv: a model whose attention keeps them, Phi-3's one q/k/v
    projection or NF4 q/k/v weights), the attention output (o_proj input), gate and up (their SwiGLU product,
    down_proj's input, is recomputed in backward), and x @ A^T (lora_rank values) of each LoRA projection; in
    float32: two RMSNorm rstd and the attention log-sum-exp per query head. bench/step_costs.py measures the
    same figure on the real forward. For anything else (HF stock layers, other kernels) measure instead:
    measure_bytes_per_token. The layer input alone is hidden_size * dtype's itemsize.
    """
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or hidden_size // num_heads
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    elements = (2 * hidden_size + 2 * q_width + (2 * kv_width if keeps_kv else 0) + 2 * intermediate_size
                + lora_rank * lora_projections)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return elements * itemsize + 4 * (2 + num_heads)


def measure_bytes_per_token(fn: Callable[..., Any], make_inputs: Callable[[int], Sequence[Any]],
                            tokens: tuple[int, int] = (64, 128)) -> float:
    """Bytes per token that fn saves for backward, measured: make_inputs(n) gives (hidden, *args)
    for n tokens; fn runs at both token counts, the distinct storages its autograd graph saves are
    summed, and the difference per token is returned (weights and constants cancel out)."""
    totals = []
    for n in tokens:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages=storages):
            storage = t.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        hidden, *args = make_inputs(n)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(hidden, *args)
        del out
        totals.append(sum(storages.values()))
    return (totals[1] - totals[0]) / (tokens[1] - tokens[0])

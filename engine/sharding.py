"""train.parallel: fsdp — the frozen base and the LoRA weights sharded over the ranks with FSDP2
(torch.distributed.fsdp.fully_shard), gathered one decoder layer at a time.

The packed forward (forward.py) reads weights straight from the model's modules; FSDP2 gathers a
module's parameters when the module is called. So the FSDP units are modules of ours, whose forward
runs the engine's functions: one ShardedLayer per decoder layer (it calls decoder_layer) and a
ShardedModel root holding the embeddings, the final norm and the head (it runs the loss). They hold
the HF submodules as children; the HF model itself is never wrapped, so nothing is planted on it and
its module names, which the adapter files use, stay the same.

Stacked projections survive sharding by becoming the parameters: a layer's q/k/v (and gate/up) frozen
weights are one [q+k+v, in] Parameter of the ShardedLayer, sharded by rows like any other and gathered
into exactly the stacked layout the grouped kernels read; the projection modules' own `weight` is then
a view of the gathered tensor, set at each call (it is not a parameter any more, so nothing is sharded
twice).

Every parameter is sharded on its first dimension, torch.chunk's way: rank r holds rows
[r * ceil(n / W), (r + 1) * ceil(n / W)) (the last ranks fewer, maybe none).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .prepare import STACKED_GROUPS, PreparedLayer, PreparedModel, Stacked


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the rows of a dim-0 sharded parameter that `rank` holds."""
    chunk = math.ceil(rows / world)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


class ShardedLayer(nn.Module):
    """One decoder layer as an FSDP unit: the HF layer and its stacked frozen weights as parameters."""

    def __init__(self, layer: PreparedLayer):
        super().__init__()
        self.block = layer.module
        self.layer = layer  # a frozen dataclass, not a module: its settings (window, RoPE, ...)
        for group, stacked in (("qkv", layer.qkv), ("gate_up", layer.gate_up)):
            if stacked is None:
                continue
            self.register_parameter(f"{group}_weight", nn.Parameter(stacked.weight, requires_grad=False))
            self.register_parameter(f"{group}_bias", None if stacked.bias is None else
                                    nn.Parameter(stacked.bias, requires_grad=False))
            for proj in self._projections(group):
                base = getattr(proj, "base_layer", proj)
                del base._parameters["weight"]  # the stacked parameter holds these rows now
                if base.bias is not None:
                    del base._parameters["bias"]

    def _projections(self, group: str) -> list[nn.Module]:
        block_name, names = {"qkv": ("self_attn", STACKED_GROUPS["self_attn"]),
                             "gate_up": ("mlp", STACKED_GROUPS["mlp"])}[group]
        block = getattr(self.block, block_name)
        return [getattr(block, n) for n in names]

    def current(self) -> PreparedLayer:
        """The layer's settings with this call's gathered stacked weights, the projections' weights their views."""
        stacks = {}
        for group in ("qkv", "gate_up"):
            weight = getattr(self, f"{group}_weight", None)
            if weight is None:
                stacks[group] = None
                continue
            bias = getattr(self, f"{group}_bias")
            start = 0
            for proj in self._projections(group):
                base = getattr(proj, "base_layer", proj)
                end = start + proj.out_features
                base.weight = weight[start:end]
                base.bias = None if bias is None else bias[start:end]
                start = end
            stacks[group] = Stacked(weight, bias)
        return dataclasses.replace(self.layer, qkv=stacks["qkv"], gate_up=stacks["gate_up"])

    def forward(self, hidden, layer, batch, prepared):
        from .forward import decoder_layer

        return decoder_layer(hidden, self.current(), batch, prepared)


class ShardedModel(nn.Module):
    """The FSDP root: embeddings, final norm and head; its forward is the packed loss."""

    def __init__(self, prepared: PreparedModel):
        super().__init__()
        inner = prepared.model.model
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, prepared.model.lm_head
        self.layers = nn.ModuleList(ShardedLayer(layer) for layer in prepared.layers)

    def forward(self, prepared, batch, reduction, checkpointer):
        from .forward import unsharded_loss

        return unsharded_loss(prepared, batch, reduction, checkpointer)


def shard_model(prepared: PreparedModel, mesh) -> PreparedModel:
    """fully_shard every decoder layer and the root; returns the PreparedModel whose forward runs them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root = ShardedModel(prepared)
    # the frozen base keeps its dtype (bf16 on GPU), the LoRA masters theirs (fp32); gradients reduce in fp32
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in root.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    for layer, following in zip(root.layers, list(root.layers)[1:]):
        layer.set_modules_to_forward_prefetch([following])  # gather the next layer while this one computes
    # each rank's loss is already divided by the whole step's target tokens: the gradients add up
    for module in (root, *root.layers):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
    return dataclasses.replace(prepared, sharded=root)

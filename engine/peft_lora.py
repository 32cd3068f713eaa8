"""Reading PEFT's LoRA layers, so the one LoRA projection path (lora.py) runs them as it runs ours.

`peft.get_peft_model` (or `PeftModel.from_pretrained`) replaces each targeted nn.Linear by a
`peft.tuners.lora.layer.Linear` that keeps the frozen layer as `base_layer` and, per adapter name,
`lora_A[name]` / `lora_B[name]` (nn.Linear, weights [r, in] / [out, r]: our layout), `scaling[name]`
and `lora_dropout[name]` (nn.Dropout or nn.Identity). `peft_adapter` hands lora.py those very
parameters, never a copy, so PEFT's optimizer, saving and merging keep working on what we train.
The state PEFT switches at run time (disable_adapter(), merge_adapter(), set_adapter()) is read on
every call. peft is not imported: these are duck-typed reads, so lorafuse needs peft only to use it.

`unsupported_reason` is the patch-time check (patch.py): what the fused path cannot compute exactly.
"""

from __future__ import annotations

import torch.nn as nn

PEFT_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")  # plain LoRA on a dense layer; subclasses differ


def is_peft_lora(module) -> bool:
    """A PEFT LoRA layer of any kind (Linear, Embedding, a quantized variant, ...)."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def active_names(layer) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def peft_adapter(layer) -> tuple | None:
    """(lora_A weight, lora_B weight, scaling, dropout probability) of a PEFT LoRA layer's active adapter;
    None for a module that is not one, or whose adapter is off (disabled, or merged into the base weight)."""
    if not is_peft_lora(layer):
        return None
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()  # as PEFT's own forward does: the base layer alone must be the base weight
        return None
    if layer.merged:
        return None
    names = active_names(layer)
    if not names:
        return None
    if len(names) > 1 or names[0] in getattr(layer, "lora_variant", {}):
        raise ValueError(f"PEFT LoRA layer {type(layer).__name__}: {unsupported_reason(layer)}")
    name = names[0]
    dropout = layer.lora_dropout[name]
    return (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name],
            dropout.p if isinstance(dropout, nn.Dropout) else 0.0)


def unsupported_reason(layer) -> str | None:
    """Why the fused path cannot compute this PEFT LoRA layer exactly as PEFT does, or None."""
    kind = (type(layer).__module__, type(layer).__name__)
    if kind != PEFT_LORA_LINEAR:
        return f"is a PEFT {kind[0]}.{kind[1]}, not plain LoRA on an nn.Linear (quantized or another layer type)"
    base = layer.base_layer
    if type(base) is not nn.Linear or not base.weight.dtype.is_floating_point:
        return f"wraps a {type(base).__name__} ({base.weight.dtype}), not a floating-point nn.Linear (quantization)"
    if getattr(layer, "fan_in_fan_out", False):
        return "has fan_in_fan_out=True (a transposed base weight)"
    names = active_names(layer)
    if len(names) > 1:
        return f"has {len(names)} active adapters ({', '.join(names)}); lorafuse runs one at a time"
    for name in layer.lora_A:
        variant = getattr(layer, "lora_variant", {}).get(name)
        if variant is not None or layer.use_dora.get(name, False):
            what = "DoRA" if layer.use_dora.get(name, False) else type(variant).__name__
            return f"adapter {name!r} is a LoRA variant ({what}); lorafuse fuses plain LoRA only"
        if layer.lora_bias.get(name, False) or layer.lora_B[name].bias is not None:
            return f"adapter {name!r} has lora_bias=True (a bias on lora_B)"
    return None

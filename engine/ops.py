"""The set of kernel ops one training forward runs, chosen once (train.kernels) and passed along.

`TRITON` is the public kernels of lorafuse.kernels: each call picks Triton or the PyTorch
reference from its tensors' device (DESIGN.md, "Kernel selection"). `REFERENCE` is every op's
PyTorch reference, whatever the device: `train.kernels: reference`, for debugging. Holding the
choice in an object the forward receives, instead of a process-wide setting, means a recomputed
layer (activation checkpointing) runs exactly what its forward ran, in any thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorafuse import kernels
from lorafuse.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_reference
from lorafuse.kernels.lora_linear import (
    lora_linear_group_reference,
    lora_linear_reference,
    lora_mlp_reference,
)
from lorafuse.kernels.rms_norm import rms_norm_branch_reference, rms_norm_reference, rms_norm_residual_reference
from lorafuse.kernels.rope import apply_rope_reference
from lorafuse.kernels.swiglu import geglu_reference, swiglu_reference


@dataclass(frozen=True)
class KernelOps:
    name: str
    lora_linear: Callable
    lora_linear_group: Callable
    lora_mlp: Callable
    rms_norm: Callable
    rms_norm_branch: Callable
    rms_norm_residual: Callable
    apply_rope: Callable
    swiglu: Callable
    geglu: Callable
    linear_cross_entropy: Callable


TRITON = KernelOps("auto", kernels.lora_linear, kernels.lora_linear_group, kernels.lora_mlp, kernels.rms_norm,
                   kernels.rms_norm_branch, kernels.rms_norm_residual, kernels.apply_rope, kernels.swiglu,
                   kernels.geglu, kernels.fused_linear_cross_entropy)
REFERENCE = KernelOps("reference", lora_linear_reference, lora_linear_group_reference, lora_mlp_reference,
                      rms_norm_reference, rms_norm_branch_reference, rms_norm_residual_reference,
                      apply_rope_reference, swiglu_reference, geglu_reference, fused_linear_cross_entropy_reference)


def kernel_ops(name: str) -> KernelOps:
    """The ops for train.kernels: "auto" (TRITON) or "reference"."""
    choices = {"auto": TRITON, "reference": REFERENCE}
    if name not in choices:
        raise ValueError(f"train.kernels must be one of {', '.join(choices)}; got {name!r}")
    return choices[name]

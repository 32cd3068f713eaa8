"""Activation checkpointing per decoder layer: what backward gets from forward.

  checkpointer.py  LayerCheckpointer: runs each layer as "none" (keep), "recompute" or "offload"
  arena.py         the pinned host memory offloaded layer inputs go to (C++ arena or its PyTorch twin)
  planner.py       the modes of a run: one setting for every layer, or a plan that fits a memory budget

Not to be confused with training checkpoints (saved adapters and optimizer state to resume from),
which are engine/train_checkpoints.py.
"""

from .arena import TorchOffloadArena, available_host_bytes, default_host_limit, make_offload_arena
from .checkpointer import MODES, LayerCheckpointer
from .planner import (
    estimate_peak_bytes,
    layer_modes,
    llama_layer_bytes_per_token,
    make_checkpointer,
    measure_bytes_per_token,
    plan_checkpointing,
)

__all__ = ["LayerCheckpointer", "MODES", "make_checkpointer", "layer_modes", "plan_checkpointing",
           "estimate_peak_bytes", "llama_layer_bytes_per_token", "measure_bytes_per_token", "TorchOffloadArena",
           "make_offload_arena", "available_host_bytes", "default_host_limit"]

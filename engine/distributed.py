"""Data parallelism over several GPUs with torch.distributed; launch with torchrun:

    torchrun --nproc_per_node=8 -m lorafuse.engine.cli train run.yaml

Every rank plans the same steps (the packing is seeded), so each knows the whole step's target
tokens with no communication; rank r runs micro-batches r, r+W, ... of each step, and one
all-reduce of the (small) LoRA gradients per step makes every rank's update identical to a
single process running all the step's micro-batches. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size()), device


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum the gradients over ranks in one flat buffer (a rank that ran no micro-batch adds zeros)."""
    if not ctx.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()

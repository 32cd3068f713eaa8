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
    grouped: bool = False  # in a process group (torchrun, or FSDP in one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device, process_group: bool = False) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise a single process, in a
    process group of its own when `process_group` (FSDP needs one, even of one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not process_group:
        return DistContext(), device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world <= 1:
            store = dist.HashStore()  # one process: nothing to rendezvous with
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), grouped=True), device


def device_mesh(ctx: DistContext, device: torch.device):
    """The 1-D mesh of all ranks that FSDP shards over."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (ctx.world,))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (train.parallel: fsdp), the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


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


def all_ranks_true(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (one small all-reduce)."""
    if not ctx.active:
        return flag
    falses = torch.tensor(float(not flag), device=device)
    return all_reduce_sum(falses, ctx).item() == 0


def shutdown(ctx: DistContext) -> None:
    if ctx.grouped and dist.is_initialized():
        dist.destroy_process_group()

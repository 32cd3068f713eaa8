"""One optimizer step over packed micro-batches: the training loop, the demo's pre-training and the
end-to-end benchmark all run this.

A step is a list of micro-batches (all ranks' together). Each micro-batch's loss is summed over its
target tokens and divided by the target tokens of the whole step, so the gradient is the mean over
every trained token in it, however the tokens fell into micro-batches or ranks. Rank r runs
micro-batches r, r+W, ...; one all-reduce sums the gradients. The update is applied only when the
weights the step started from, its loss and its gradient norm are all finite; one host sync reads
the three. With a guard.LastGood, the state the update starts from is kept first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .distributed import DistContext, all_reduce_grads, all_reduce_sum
from .forward import packed_loss
from .guard import LastGood, weights_finite
from .packing import IGNORE_INDEX, PackedBatch
from .prepare import PreparedModel


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean per target token over the whole step
    grad_norm: float  # before clipping
    weights_finite: bool  # the weights the step started from (False: the previous update broke them)
    applied: bool  # False: something was not finite and the weights were left as they were


def train_step(prepared: PreparedModel, micro_batches: list[PackedBatch], optimizer, params: list[torch.Tensor], *,
               max_grad_norm: float = 0.0, checkpointer=None, ctx: DistContext | None = None,
               last_good: LastGood | None = None, step: int = 0) -> StepResult:
    """Forward and backward over this rank's share of micro_batches, all-reduce, clip (max_grad_norm > 0),
    and the optimizer update when everything is finite (`step`: updates applied so far, for last_good).
    The gradients are cleared either way."""
    ctx = ctx or DistContext()
    device = prepared.device
    step_targets = sum(b.num_target_tokens for b in micro_batches)
    loss_sum = torch.zeros((), device=device)
    for batch in rank_share(micro_batches, ctx, sharded=prepared.sharded is not None):
        loss = packed_loss(prepared, batch.to(device), reduction="sum", checkpointer=checkpointer) / step_targets
        loss.backward()
        loss_sum += loss.detach()
    if prepared.sharded is None:
        all_reduce_grads(params, ctx)  # sharded: FSDP has summed each rank's gradients into its shards
    # the step's loss and how many ranks hold non-finite weights (sharded, each rank checks its own shards)
    totals = all_reduce_sum(torch.stack([loss_sum.float(), (~weights_finite(params)).float()]), ctx)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    checks = torch.stack([totals[0], _full(grad_norm).float(), totals[1]])
    loss_value, norm_value, bad = checks.tolist()  # the one host sync per step
    weights_ok = bad == 0
    applied = weights_ok and math.isfinite(loss_value) and math.isfinite(norm_value)
    if applied:
        if last_good is not None:
            last_good.keep(step)
        optimizer.step()
        if prepared.lora_gemm is not None:
            prepared.lora_gemm.refresh()  # the B columns of the [W | B] buffers follow the masters (lora_gemm.py)
    optimizer.zero_grad(set_to_none=True)
    if checkpointer is not None:
        checkpointer.end_step()  # the offload arena is reused by the next step
    return StepResult(loss_value, norm_value, weights_ok, applied)


def rank_share(micro_batches: list[PackedBatch], ctx: DistContext, sharded: bool) -> list[PackedBatch]:
    """This rank's micro-batches of a step: r, r+W, ... Sharded, every rank must run as many forwards as
    the others (each gathers weights with all of them), so a rank short of one runs a micro-batch with no
    target: a loss of 0 and no gradient."""
    share = micro_batches[ctx.rank::ctx.world]
    if sharded:
        rounds = -(-len(micro_batches) // ctx.world)
        share += [no_targets(micro_batches[0])] * (rounds - len(share))
    return share


def no_targets(batch: PackedBatch) -> PackedBatch:
    return dataclasses.replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX), num_target_tokens=0)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded result (clip_grad_norm_ of sharded gradients) as the whole value."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t

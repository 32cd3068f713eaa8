"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, say how to resume.

The first signal only raises a flag the loop reads after each step (all ranks agree on it through
one small all-reduce); a second signal aborts at once, as Python's default would.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

from .distributed import DistContext, all_reduce_sum


@contextlib.contextmanager
def stop_signals(ctx: DistContext, device: torch.device, log):
    """Yields interrupted(): True once SIGINT or SIGTERM arrived (on any rank)."""
    flag = {"raised": False}

    def handler(signum, frame):
        if flag["raised"]:
            raise KeyboardInterrupt
        flag["raised"] = True
        log(f"\n[train] {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(again to abort at once)")

    def interrupted() -> bool:
        if not ctx.active:
            return flag["raised"]
        raised = torch.tensor(float(flag["raised"]), device=device)
        return bool(all_reduce_sum(raised, ctx).item())

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield interrupted
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

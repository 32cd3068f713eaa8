"""The MFU denominator: the GPU's measured bf16 matmul peak, taken once the clocks are up. The env stage
of bench/run.py and bench/e2e.py measure it alike through this one function."""

from __future__ import annotations

import time

import torch


def measured_peak_flops(device: torch.device, warm_s: float = 1.0) -> float:
    """lorafuse.engine.metrics.peak_matmul_flops (bf16 8192^3 matmuls, FLOP/s), measured after `warm_s`
    seconds of matmuls so the clocks are up."""
    from lorafuse.engine.metrics import peak_matmul_flops

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ends = time.monotonic() + warm_s
    while time.monotonic() < ends:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize(device)
    del a
    return peak_matmul_flops(device)

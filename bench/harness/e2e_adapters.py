"""Identical starting points for every system: PEFT's adapter initialisation drawn per module path from a
seeded generator, and the fingerprints that show in every row that two systems started equal."""

from __future__ import annotations

import math
import zlib

import torch


def fingerprint(tensors) -> float:
    """A cheap checksum of a sequence of tensors (their first 4096 elements each, position-weighted): equal
    fingerprints show that two systems started from the same weights or adapters."""
    total = 0.0
    sums = [t.detach().reshape(-1)[:4096].double().sum() for t in tensors]
    if sums:
        total = float(sum((i % 13 + 1) * s for i, s in enumerate(sums)))
    return total


def weights_fingerprint(model) -> float:
    return fingerprint([p for _, p in sorted(model.named_parameters())])


@torch.no_grad()
def init_lora_(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int) -> None:
    """PEFT's initialisation (A kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zeros)
    drawn from a generator seeded per module path, so every system, in any process, starts from the
    same adapters whatever order its modules were created in."""
    for name in sorted(pairs):
        lora_a, lora_b = pairs[name]
        generator = torch.Generator(device=lora_a.device)
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(lora_a.shape[1])
        values = torch.rand(lora_a.shape, generator=generator, device=lora_a.device, dtype=torch.float32)
        lora_a.copy_((values * 2 - 1) * bound)
        lora_b.zero_()


def lora_fingerprint(pairs) -> float:
    return fingerprint([t for name in sorted(pairs) for t in pairs[name]])

"""What a failed training step means: out of memory is a result (device memory, or the offload arena's
host limit), a sticky CUDA error ends the process's work (CudaBroken), anything else is recorded; and
freeing what a step left before the next one."""

from __future__ import annotations

import gc

import torch


class CudaBroken(RuntimeError):
    """A CUDA error that poisons the context: nothing else can run in this process."""


_STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                       "misaligned address", "illegal instruction", "an illegal")


def is_oom(error: BaseException) -> str | None:
    """'oom' (device memory: the caching allocator, or a library's own allocation such as cuBLAS's
    workspace), 'host' (the offload arena's host limit) or None."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "oom"
    text = str(error)
    if "arena overflow" in text:
        return "host"
    if isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text):
        return None if _is_fatal(error) else "oom"
    return None


def _is_fatal(error: BaseException) -> bool:
    """A CUDA error that leaves the context unusable: nothing else can run in this process."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(e in text for e in _STICKY_CUDA_ERRORS)


def oom_kind_or_raise(error: BaseException) -> str | None:
    """The OOM kind of a failed step ('oom' or 'host'), None for another recoverable error; a sticky
    CUDA error is raised again as CudaBroken (nothing else can run in this process)."""
    kind = is_oom(error)
    if kind is None and _is_fatal(error):
        raise CudaBroken(f"{type(error).__name__}: {error}") from error
    return kind


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()

"""Kernel micro-benchmarks (pytest-benchmark).

On a CUDA GPU they time real sizes: `measure` takes the median of triton.testing.do_bench (CUDA
events, after warm-up) and records it with the case's FLOPs and bytes in the benchmark's
extra_info, which `lorafuse bench` collects into bench/results/. Without a GPU they run in smoke
mode: tiny sizes, each case once, timing off, so the benchmarks never rot.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if __import__("torch").cuda.is_available() else "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

GPU = torch.cuda.is_available()
SMOKE = not GPU


@pytest.fixture
def device():
    return "cuda" if GPU else "cpu"


@pytest.fixture
def dtype():
    return torch.bfloat16 if GPU else torch.float32


def measure(benchmark, fn, *, flops: float | None = None, bytes_moved: float | None = None, **info):
    """Time fn (a zero-argument callable that runs the case once) and record what it did."""
    benchmark.extra_info.update(info)
    if SMOKE:
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return None
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
    benchmark.extra_info["median_ms"] = ms
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / ms / 1e9
    if bytes_moved is not None:
        benchmark.extra_info["gb_per_s"] = bytes_moved / ms / 1e6
    benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=3, iterations=1, warmup_rounds=1)
    return ms

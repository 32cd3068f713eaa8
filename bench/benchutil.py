"""What the kernel micro-benchmarks share: the mode they run in and `measure`.

On a CUDA GPU with compiled kernels (TRITON_INTERPRET unset or off: "", 0, false or off; one reading,
lorafuse._interpreter) they time real sizes: `measure` takes the median of triton.testing.do_bench (CUDA
events, after warm-up) and records it with the case's FLOPs and bytes in the benchmark's extra_info, which
the benchmark runner collects into bench/results/. Otherwise (no GPU, or Triton's interpreter on) they run
in smoke mode: tiny sizes, each case once, timing off, so the benchmarks never rot.
"""

from __future__ import annotations

import gc

import torch

from lorafuse._interpreter import interpreter_requested

INTERPRET = interpreter_requested()
GPU = torch.cuda.is_available() and not INTERPRET
SMOKE = not GPU


def measure(benchmark, fn, *, flops: float | None = None, bytes_moved: float | None = None, **info):
    """Time fn (a zero-argument callable that runs the case once) and record what it did.

    On a GPU: one run to compile and autotune, one after a reset of the peak-memory counter
    (peak_mem_gb: inputs included; peak_above_inputs_gb: less what was allocated before the run), then
    do_bench's median. A case that runs out of memory is skipped with "(oom)" in the reason."""
    benchmark.extra_info.update(info)
    if SMOKE:
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return None
    import pytest
    import triton.testing

    def synced():
        fn()
        torch.cuda.synchronize()

    try:
        synced()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        synced()
        peak = torch.cuda.max_memory_allocated()
        ms = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
        benchmark.pedantic(synced, rounds=3, iterations=1, warmup_rounds=0)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{info.get('system', 'case')} ran out of GPU memory at {info.get('shape', '?')} (oom)")
    benchmark.extra_info.update(median_ms=ms, peak_mem_gb=peak / 2**30, peak_above_inputs_gb=(peak - before) / 2**30)
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / ms / 1e9
    if bytes_moved is not None:
        benchmark.extra_info["gb_per_s"] = bytes_moved / ms / 1e6
    return ms

"""Measuring one case of the end-to-end benchmark: its steps timed (CUDA events around the whole step),
tokens/s of the median step, peak memory, MFU and every step's loss; out of memory is a result."""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from e2e_failures import free_memory, oom_kind_or_raise
from e2e_runner import Prepared, Runner

GIB = 2**30


def timed_step(runner: Runner, prep: Prepared) -> tuple[float, float]:
    """(seconds, loss) of one step; CUDA events on the GPU, wall clock on the CPU."""
    if runner.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = runner.step(prep)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, float(loss)
    started = time.perf_counter()
    loss = runner.step(prep)
    return time.perf_counter() - started, float(loss)


def measure_case(runner: Runner, steps: list[list], warmup: int, peak_flops: float | None, log=print) -> dict:
    """Train len(steps) steps; the ones after `warmup` are timed. Never raises for OOM."""
    row: dict = {"oom": False, "step_losses": [], "warmup": warmup, "steps": len(steps) - warmup}
    prepared = [runner.prepare(docs) for docs in steps]
    row["useful_tokens_per_step"] = [p.useful_tokens for p in prepared]
    row["processed_tokens_per_step"] = [p.processed_tokens for p in prepared]
    row["micro_batches_per_step"] = [len(p.micro) for p in prepared]
    row["target_tokens_per_step"] = [p.targets for p in prepared]
    flops = [runner.flops([len(d) for d in docs]) for docs in steps]
    times: list[float] = []
    failure = None
    base_mem = None
    try:
        for index, prep in enumerate(prepared):
            if index == warmup and runner.cuda:
                torch.cuda.synchronize(runner.device)
                torch.cuda.reset_peak_memory_stats(runner.device)
                base_mem = torch.cuda.memory_allocated(runner.device)
            seconds, loss = timed_step(runner, prep)
            row["step_losses"].append(loss)
            if index >= warmup:
                times.append(seconds)
            log(f"  [{runner.case}] step {index + 1}/{len(prepared)}: loss {loss:.5f}, {seconds * 1e3:.0f} ms"
                + (" (warm-up)" if index < warmup else ""))
    except Exception as error:  # noqa: BLE001 - OOM is a result; anything else is recorded, then re-raised if fatal
        failure = error
    if failure is not None:
        kind = oom_kind_or_raise(failure)
        if kind is None:
            row["error"] = f"{type(failure).__name__}: {failure}"
            row["traceback"] = traceback.format_exception(failure)[-6:]
        else:
            row["oom"] = True
            row["oom_kind"] = kind
            row["oom_at_step"] = len(row["step_losses"]) + 1
        failure = None  # drop the traceback's frames (activations) before freeing memory
        runner.after_failure()
        free_memory(runner.device)
        log(f"  [{runner.case}] {'out of memory' if row['oom'] else row['error']}")
        return row

    tokens = row["useful_tokens_per_step"][warmup:]
    timed_flops = flops[warmup:]
    if times:
        # Steady state: the median step (a one-off compile or autotune in a timed step does not count);
        # every step holds the same number of useful tokens, so tokens/s is that over the median time.
        row["step_time_s"] = statistics.median(times)
        row["step_times_s"] = times
        row["tokens_per_s"] = statistics.mean(tokens) / row["step_time_s"]
        row["tokens_per_s_mean"] = sum(tokens) / sum(times)  # over the total time of the timed steps
        row["model_tflops_per_step"] = statistics.mean(timed_flops) / 1e12
        if peak_flops:
            row["mfu"] = statistics.mean(timed_flops) / row["step_time_s"] / peak_flops
            row["mfu_mean"] = sum(timed_flops) / sum(times) / peak_flops
        else:
            row["mfu"] = None
    else:
        row.update(step_time_s=None, tokens_per_s=None, mfu=None)
    row["padding_fraction"] = 1 - sum(row["useful_tokens_per_step"]) / sum(row["processed_tokens_per_step"])
    if runner.cuda:
        peak = torch.cuda.max_memory_allocated(runner.device)
        row["peak_mem_gb"] = peak / GIB
        row["mem_before_steps_gb"] = base_mem / GIB if base_mem is not None else None
    else:
        row["peak_mem_gb"] = None
    return row

"""The max-context search of the end-to-end benchmark: the largest single document that trains one step,
by doubling then bisection, within a time budget (a search stopped by time is a lower bound)."""

from __future__ import annotations

import time

import torch

from e2e_data import single_document
from e2e_failures import free_memory, oom_kind_or_raise
from e2e_measure import GIB, timed_step
from e2e_runner import Runner


def _probe_flops(runner: Runner, tokens: int) -> float:
    return runner.flops([tokens])


def max_context_search(runner: Runner, vocab_size: int, *, start: int, granularity: int, limit: int,
                       deadline: float, seed: int, log=print, progress=None) -> dict:
    """The largest single document that trains one step: doubling from `start` until a step runs out of
    memory, then bisection to `granularity` tokens. A probe whose predicted time (its model FLOPs at the
    fastest rate seen so far) would pass `deadline` (time.monotonic()) is not started: the result is
    then a lower bound (limited_by "time"). progress(partial result) is called after every probe, so a
    process stopped mid-search still leaves its lower bound."""
    probes: list[dict] = []
    best_rate = None
    good, bad = 0, None

    def fits(tokens: int) -> bool:
        nonlocal best_rate
        doc = single_document(tokens, vocab_size, seed)
        prep = runner.prepare([doc])
        probe = {"tokens": tokens}
        if runner.cuda:
            torch.cuda.reset_peak_memory_stats(runner.device)
        started = time.monotonic()
        failure = None
        try:
            seconds, loss = timed_step(runner, prep)
            probe.update(status="ok", seconds=seconds, loss=loss)
            best_rate = max(best_rate or 0.0, _probe_flops(runner, tokens) / max(seconds, 1e-9))
        except Exception as error:  # noqa: BLE001
            failure = error
        if failure is not None:
            kind = oom_kind_or_raise(failure)
            if kind is None:
                probe["status"] = f"error: {type(failure).__name__}: {str(failure)[:300]}"
            else:
                probe["status"] = "oom" if kind == "oom" else "host_limit"
            probe["seconds"] = time.monotonic() - started
            failure = None
            runner.after_failure()
        if runner.cuda:
            probe["peak_mem_gb"] = torch.cuda.max_memory_allocated(runner.device) / GIB
        del prep
        free_memory(runner.device)
        probes.append(probe)
        log(f"  [{runner.case}] max context probe {tokens} tokens: {probe['status']} ({probe['seconds']:.1f} s)")
        ok = probe["status"] == "ok"
        if progress is not None:
            progress({"largest_tokens": max(good, tokens) if ok else good,
                      "first_failure": bad if ok else tokens,
                      "limited_by": "stopped (in progress)", "granularity": granularity, "probes": probes})
        return ok

    def affordable(tokens: int) -> bool:
        if best_rate is None:
            return time.monotonic() < deadline
        return time.monotonic() + _probe_flops(runner, tokens) / best_rate < deadline

    limited_by = "limit"
    tokens = start
    while tokens <= limit:
        if not affordable(tokens):
            limited_by = "time"
            break
        if not fits(tokens):
            bad = tokens
            limited_by = "memory" if probes[-1]["status"] in ("oom", "host_limit") else "error"
            break
        good, tokens = tokens, tokens * 2
    while bad is not None and limited_by == "memory" and bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if not affordable(middle):
            limited_by = "time"
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return {"largest_tokens": good, "first_failure": bad, "limited_by": limited_by, "granularity": granularity,
            "probes": probes}

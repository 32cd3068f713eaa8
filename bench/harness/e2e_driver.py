"""The end-to-end benchmark's run: one model built per group of cases, each case trained from the same
initial adapters, the max-context searches, all under one time budget, the results file rewritten after
every case (bench/e2e.py is its command line)."""

from __future__ import annotations

import datetime
import math
import os
import time
import traceback

from e2e_cases import CASES, case_available, groups, plan
from e2e_data import make_steps
from e2e_failures import CudaBroken, free_memory
from e2e_hf_runner import HFRunner
from e2e_lorafuse_runner import LorafuseRunner, offload_host_limit
from e2e_max_context import max_context_search
from e2e_measure import measure_case
from e2e_models import LORA_ALPHA, LORA_R, PROJECTIONS, model_config
from e2e_rows import CONTEXT_KEYS, entry, environment, fail_row, print_row, save
from e2e_runner import Runner, Settings
from gpu_peak import measured_peak_flops


def run(args, log=print) -> dict:
    """Run every case of args.systems (and the max-context searches of args.max_context) on args.model."""
    started = time.monotonic()
    deadline = started + args.time_budget_s if args.time_budget_s else math.inf
    device, dtype = args.device, args.dtype
    cuda = device.type == "cuda"
    if not cuda:
        os.environ.setdefault("LORAFUSE_KERNELS", "reference")  # the interpreter would take hours
    results = {"benchmark": "e2e", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": args.command, "env": environment(device),
               "config": {"model": args.model, "tokens_per_step": args.tokens_per_step, "warmup": args.warmup,
                          "steps": args.steps, "seed": args.seed, "lr": args.lr, "lora_r": LORA_R,
                          "lora_alpha": LORA_ALPHA, "target_modules": PROJECTIONS,
                          "stock_batch_size": args.stock_batch_size, "layers": args.layers,
                          "data": vars(args.mix), "max_context_start": args.max_context_start,
                          "max_context_step": args.max_context_step, "max_context_limit": args.max_context_limit,
                          "max_context_budget_s": args.max_context_budget_s},
               "e2e": [], "max_context": [], "skipped": []}
    peak = None
    if cuda:
        peak = measured_peak_flops(device)
        free_memory(device)
        results["peak_bf16_tflops"] = peak / 1e12
    save(results, args.out)

    config = model_config(args.model, args.layers)
    steps = make_steps(args.warmup + args.steps, args.tokens_per_step, config.vocab_size, args.mix, args.seed)
    settings = Settings(model=args.model, device=device, dtype=dtype, seed=args.seed, layers=args.layers, lr=args.lr,
                        stock_batch_size=args.stock_batch_size,
                        min_offload_bytes=None if cuda else 0,
                        host_limit_bytes=offload_host_limit(cuda))
    cases = [c for c in args.systems if c in CASES]
    for case in list(cases):
        why = case_available(case)
        if why:
            results["skipped"].append({"case": case, "reason": why})
            log(f"[e2e] skip {case}: {why}")
            cases.remove(case)
    broken = None
    for group in groups(cases):
        if broken:
            for case in group:
                results["skipped"].append({"case": case, "reason": f"CUDA context lost earlier: {broken}"})
            continue
        runner = None
        try:
            log(f"[e2e] {args.model}: building for {', '.join(group)}")
            built = time.monotonic()
            if group[0].startswith("lorafuse-") or group[0] == "qlora-lorafuse":
                runner = LorafuseRunner(settings, quantize="nf4" if group[0] == "qlora-lorafuse" else "none")
            else:
                runner = HFRunner(settings, group[0])
            runner.info["build_s"] = time.monotonic() - built
            for kind, case in plan(group, args.max_context):
                if kind == "train":
                    _train_case(args, results, runner, case, steps, peak, deadline, log)
                else:
                    _context_case(args, results, runner, case, config.vocab_size, deadline, log)
        except CudaBroken as error:
            broken = str(error)[:300]
            results.setdefault("errors", []).append({"cases": group, "error": broken})
            log(f"[e2e] {group}: CUDA error, stopping this process: {broken}")
        except Exception as error:  # noqa: BLE001 - building failed: one system failing must not lose the others
            results.setdefault("errors", []).append(
                {"cases": group, "error": f"{type(error).__name__}: {error}",
                 "traceback": traceback.format_exception(error)[-8:]})
            for case in group:
                if not any(r["case"] == case for r in results["e2e"]):
                    row = entry(args, case, None)
                    fail_row(row, error, log, when="building the model")
                    results["e2e"].append(row)
            error = None
        finally:
            if runner is not None:
                runner.close()
            runner = None
            free_memory(device)
        save(results, args.out)
    results["seconds"] = time.monotonic() - started
    save(results, args.out)
    return results


def _switch(runner: Runner, case: str) -> None:
    """Put a shared model into `case` (checkpointing mode or batching), from the initial adapters."""
    if isinstance(runner, LorafuseRunner):
        runner.set_mode(CASES[case][1])
    else:
        runner.set_case(case)
    runner.reset_adapters()


def _train_case(args, results: dict, runner: Runner, case: str, steps, peak, deadline: float, log) -> None:
    # a case is not started when the last one on this model took longer than what is left
    needed = 0.8 * runner.info.get("last_case_s", 0.0)
    if time.monotonic() + needed > deadline:
        results["skipped"].append({"case": case, "reason": f"time budget spent (needs ~{needed:.0f} s)"})
        log(f"[e2e] skip {case}: time budget spent")
        return
    case_started = time.monotonic()
    row = entry(args, case, runner)
    try:
        _switch(runner, case)
        row = entry(args, case, runner)
        log(f"[e2e] {case}: {args.warmup} warm-up + {args.steps} timed steps of {args.tokens_per_step} tokens")
        row.update(measure_case(runner, steps, args.warmup, peak, log))
        row["peak_flops_tflops"] = peak / 1e12 if peak else None
    except CudaBroken:
        raise
    except Exception as error:  # noqa: BLE001 - recorded; the next case still runs
        fail_row(row, error, log)
        error = None
        runner.after_failure()
        free_memory(runner.device)
    runner.info["last_case_s"] = time.monotonic() - case_started
    row["case_s"] = runner.info["last_case_s"]
    row.pop("last_case_s", None)
    results["e2e"].append(row)
    save(results, args.out)
    print_row(row, log)


def _context_case(args, results: dict, runner: Runner, case: str, vocab_size: int, deadline: float, log) -> None:
    budget_end = min(deadline, time.monotonic() + args.max_context_budget_s)
    row = {k: v for k, v in entry(args, case, runner).items() if k in CONTEXT_KEYS}
    row.update(largest_tokens=0, first_failure=None, limited_by="stopped (in progress)", probes=[])
    results["max_context"].append(row)

    def progress(partial):
        row.update(partial)
        save(results, args.out)

    try:
        _switch(runner, case)
        row.update({k: v for k, v in entry(args, case, runner).items() if k in CONTEXT_KEYS})
        log(f"[e2e] {case}: max-context search (budget {budget_end - time.monotonic():.0f} s)")
        found = max_context_search(runner, vocab_size, start=args.max_context_start,
                                   granularity=args.max_context_step, limit=args.max_context_limit,
                                   deadline=budget_end, seed=args.seed, log=log, progress=progress)
        row.update(found)
        log(f"[e2e] {case}: largest single document {found['largest_tokens']} tokens "
            f"(limited by {found['limited_by']})")
    except CudaBroken:
        raise
    except Exception as error:  # noqa: BLE001
        row.update(limited_by="error", error=f"{type(error).__name__}: {error}")
        log(f"[e2e] {case}: max-context search failed: {row['error']}")
        error = None
        runner.after_failure()
        free_memory(runner.device)
    save(results, args.out)

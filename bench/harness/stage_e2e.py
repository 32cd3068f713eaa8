"""The e2e and peers stages of bench/run.py: bench/e2e.py per model, one process per built model (stock with
its max-context search and hf_packed; the lorafuse modes with theirs; each peer alone), their rows gathered
into the results file, a row for every case a process left without one."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from results_file import merge_stage
from stage_process import BENCH, gpu_env, outcome, overall, run_logged

MODEL_FOR_SMALL_GPUS = "llama-3.2-1b"
SMALL_GPU_GIB = 40
EXTRA_MODELS = ["qwen2.5-7b", "mistral-7b", "llama-3.2-1b"]
E2E_STEPS = {False: (2, 5), True: (1, 3)}  # (warm-up, timed) steps


def _e2e_process(results: dict, args, model: str, cases: list[str], max_context: list[str], budget: float,
                 max_context_budget: float, work: Path, tag: str) -> dict:
    out = work / f"e2e-{model}-{tag}.json"
    out.unlink(missing_ok=True)
    warmup, steps = E2E_STEPS[args.quick]
    cmd = [sys.executable, str(BENCH / "e2e.py"), "--model", model, "--systems", *cases,
           "--max-context", *(max_context or ["none"]), "--tokens-per-step", str(args.tokens_per_step),
           "--warmup", str(warmup), "--steps", str(steps), "--time-budget-s", f"{budget:.0f}",
           "--max-context-budget-s", f"{max_context_budget:.0f}", "--out", str(out), *args.e2e_args]
    # e2e stops starting work at its own deadline; the kill is for a step that hangs past it
    res = run_logged(cmd, budget + 30, env=gpu_env(), log_path=work / f"e2e-{model}-{tag}.log", echo=args.verbose)
    data = json.loads(out.read_text()) if out.is_file() else {}
    results["e2e"].extend(data.get("e2e", []))
    results["max_context"].extend(data.get("max_context", []))
    done = {r["case"] for r in data.get("e2e", [])}
    skipped = {s["case"] for s in data.get("skipped", [])}
    why = "timed out" if res["timed_out"] else f"process exited with rc {res['rc']}"
    for case in cases:
        if case not in done and case not in skipped:
            results["e2e"].append(_missing_row(args, model, case, f"no result: {why}"))
    stage = merge_stage(tag)
    for skip in data.get("skipped", []):
        results.setdefault("e2e_skipped", []).append({"model": model, "stage": stage, **skip})
    for error in data.get("errors", []):
        results.setdefault("e2e_errors", []).append({"model": model, "stage": stage, **error})
    if data.get("command"):
        results.setdefault("e2e_commands", []).append({"stage": stage, "command": data["command"]})
    if data.get("config") and "e2e_config" not in results:
        results["e2e_config"] = {k: v for k, v in data["config"].items() if k != "model"}
    return outcome(res)


def _missing_row(args, model: str, case: str, why: str) -> dict:
    """An e2e row for a case that produced nothing (its process died, or there was no time)."""
    system, checkpointing = case.split("-", 1) if case.startswith("lorafuse-") else (case, "hf")
    return {"model": model, "system": system, "case": case, "checkpointing": checkpointing,
            "tokens_per_step": args.tokens_per_step, "tokens_per_s": None, "step_time_s": None,
            "peak_mem_gb": None, "mfu": None, "step_losses": [], "oom": False, "error": why}


def _models(args, results: dict) -> list[str]:
    if args.models:
        return list(args.models)
    memory = results.get("gpu_memory_gb") or 0
    first = MODEL_FOR_SMALL_GPUS if memory and memory < SMALL_GPU_GIB else "llama-3.1-8b"
    return [first] + ([m for m in EXTRA_MODELS if m != first] if args.all_models else [])


def stage_e2e(results: dict, args, budget: float, work: Path) -> dict:
    """Per model, two processes: stock (+ hf_patched, its max-context search, hf_packed) with 40% of the model's share,
    then lorafuse none / recompute / offload (+ the max-context searches) with the rest. The models share
    the budget evenly; a later model is skipped when less than 2 minutes are left."""
    ends = time.monotonic() + budget
    runs = {}
    models = _models(args, results)
    for index, model in enumerate(models):
        left = ends - time.monotonic()
        if index > 0 and left < 120:
            runs[model] = {"status": "skipped: no time left"}
            continue
        share = left / (len(models) - index)
        hf_budget = 0.4 * share
        mc_stock = [c for c in args.max_context if c == "stock"]
        mc_lorafuse = [c for c in args.max_context if c.startswith("lorafuse-")]
        # stock, hf_patched, stock's max-context search, then hf_packed (skipped by e2e.py where transformers cannot)
        runs[f"{model}/stock"] = _e2e_process(results, args, model, ["stock", "hf_patched", "hf_packed"], mc_stock,
                                              hf_budget, 0.45 * hf_budget, work, "stock")
        # what the HF process left unused goes to lorafuse; later models keep their shares
        lorafuse_budget = ends - time.monotonic() - share * (len(models) - index - 1)
        lorafuse_cases = ["lorafuse-none", "lorafuse-recompute", "lorafuse-offload"]
        if lorafuse_budget < 30:
            runs[f"{model}/lorafuse"] = {"status": "skipped: no time left"}
            results["e2e"] += [_missing_row(args, model, case, "skipped: no time left") for case in lorafuse_cases]
            continue
        runs[f"{model}/lorafuse"] = _e2e_process(results, args, model, lorafuse_cases, mc_lorafuse,
                                                 lorafuse_budget, 0.3 * lorafuse_budget, work, "lorafuse")
    return {"status": overall(runs), "runs": runs}


def available_peers(results: dict) -> list[str]:
    """Peers that need their own process (hf_packed runs with stock, on the same model): liger where installed,
    QLoRA (lorafuse on NF4 weights, and PEFT + bitsandbytes where bitsandbytes imports)."""
    return (["liger"] if results.get("liger_kernel") else []) + ["qlora-lorafuse"] + \
        (["qlora-peft"] if results.get("bitsandbytes") else [])


def stage_peers(results: dict, args, budget: float, work: Path) -> dict:
    """liger (where installed) and the QLoRA cases on the first model, each in its own process."""
    peers = available_peers(results)
    if not peers:
        return {"status": "skipped: no peer available"}
    model = _models(args, results)[0]
    ends = time.monotonic() + budget
    runs = {}
    for index, peer in enumerate(peers):
        left = (ends - time.monotonic()) / (len(peers) - index)
        if left < 40:
            runs[peer] = {"status": "skipped: no time left"}
            continue
        runs[peer] = _e2e_process(results, args, model, [peer], [], left, 0, work, peer)
    return {"status": overall(runs), "runs": runs}

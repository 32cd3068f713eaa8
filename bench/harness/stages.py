"""The stages of bench/run.py in order, their time budgets, and the loop that runs them: each stage gets its
own budget (e2e and peers what is left), a failing stage is recorded and the next one runs, and the
results file is rewritten after every stage."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from stage_static import stage_static

from results_file import carry_over, new_results, results_path, write_results
from stage_checkpointing import stage_checkpointing
from stage_e2e import available_peers, stage_e2e, stage_peers
from stage_env import stage_env
from stage_kernels import kernel_files, stage_kernels
from stage_tests import stage_tests

STAGES = ("env", "tests", "kernels", "e2e", "peers", "checkpointing", "static")
REPORT_RESERVE_S = 15.0  # kept back at the end for writing the report

# budgets in seconds: (full run, --quick)
BUDGETS = {"total": (570, 330), "env": (150, 120), "tests": (90, 60), "kernels": (120, 60),
           "checkpointing": (120, 60), "static": (300, 200)}
PEER_BUDGET_S = (75, 0)  # kept back for each available peer (full run, --quick)

STAGE_FUNCS = {"env": stage_env, "tests": stage_tests, "kernels": stage_kernels, "e2e": stage_e2e,
               "peers": stage_peers, "checkpointing": stage_checkpointing, "static": stage_static}


def selected_stages(args) -> list[str]:
    """--only and --skip applied; checkpointing only when asked for; env always (the GPU name names the file)."""
    selected = [s for s in STAGES if (args.only is None or s in args.only or s == "env") and s not in args.skip]
    if "checkpointing" in selected and not (args.with_checkpointing or (args.only and "checkpointing" in args.only)):
        selected.remove("checkpointing")
    if "static" in selected and not (getattr(args, "with_static", False) or (args.only and "static" in args.only)):
        selected.remove("static")
    if "env" not in selected:
        selected.insert(0, "env")  # the GPU name names the file
    return selected


def run_stages(args, given: list[str]) -> tuple[dict, Path]:
    """Every selected stage within the run's time budget; the results and the file they are in."""
    budget_index = 1 if args.quick else 0
    total = args.time_budget_s or BUDGETS["total"][budget_index]
    started = time.monotonic()
    deadline = started + total
    selected = selected_stages(args)
    stage_budgets = dict(args.stage_budget)
    results = new_results(args, given)
    if args.logs:
        work = Path(args.logs)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="lorafuse-bench-"))
    results["logs"] = str(work)
    for stage in selected:
        left = deadline - time.monotonic() - REPORT_RESERVE_S
        reserve = BUDGETS["checkpointing"][budget_index] if "checkpointing" in selected else 0.0
        if stage == "e2e":  # gets all the time but what the later stages are promised
            if "peers" in selected:
                reserve += PEER_BUDGET_S[budget_index] * len(available_peers(results))
            budget = left - reserve
        elif stage == "peers":
            budget = left - reserve
        else:
            budget = min(stage_budgets.get(stage, BUDGETS[stage][budget_index]), left)
        if budget < 20:
            results["stages"][stage] = {"status": "skipped: no time left"}
            continue
        print(f"\n===== [{stage}] budget {budget:.0f} s =====", flush=True)
        stage_started = time.monotonic()
        try:
            results["stages"][stage] = STAGE_FUNCS[stage](results, args, budget, work)
        except Exception as error:  # noqa: BLE001 - a stage failing must not lose the others
            results["stages"][stage] = {"status": f"error: {type(error).__name__}: {error}"}
        results["stages"][stage].setdefault("seconds", time.monotonic() - stage_started)
        results["stages"][stage]["budget_s"] = budget
        results["duration_s"] = time.monotonic() - started
        path = results_path(results, args)
        if stage == "env" and args.merge and path.is_file():
            carry_over(json.loads(path.read_text(encoding="utf-8")), results, selected,
                       [f.name for f in kernel_files(args)])
        write_results(results, path)
        print(f"===== [{stage}] {results['stages'][stage]['status']} "
              f"({time.monotonic() - stage_started:.0f} s); results in {path}", flush=True)
    results["duration_s"] = time.monotonic() - started
    path = results_path(results, args)
    write_results(results, path)
    return results, path

"""The checkpointing stage of bench/run.py (only with --with-checkpointing): bench/bench_checkpointing.py at
8 layers, 16k and 32k tokens, no search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stage_process import BENCH, gpu_env, outcome, run_logged


def stage_checkpointing(results: dict, args, budget: float, work: Path) -> dict:
    out = work / "checkpointing.json"
    cmd = [sys.executable, str(BENCH / "bench_checkpointing.py"), "--layers", "8", "--tokens", "16384", "32768",
           "--no-search", "--out", str(out)]
    res = run_logged(cmd, budget, env=gpu_env(), log_path=work / "checkpointing.log", echo=args.verbose)
    if out.is_file():
        data = json.loads(out.read_text())
        results["checkpointing"] = {k: data.get(k) for k in ("config", "rows", "offload_vs_recompute",
                                                             "offload_backend", "command")}
    return outcome(res)

"""The results file of bench/run.py: bench/results/<gpu>-<date>.json, its first contents, atomic rewrites
(bench/e2e.py writes its own file the same way), and --merge, which keeps what earlier calls into the same
file measured in the stages not run again."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from stage_process import ROOT

PEER_CASES = ("liger", "qlora-lorafuse", "qlora-peft")  # e2e rows the peers stage makes


def merge_stage(case: str | None) -> str:
    """The stage whose e2e rows, skips and errors these are: what --merge keeps or replaces."""
    return "peers" if case in PEER_CASES else "e2e"


def gpu_slug(name: str | None) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"; no GPU -> "cpu"."""
    if not name:
        return "cpu"
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").split("-")
    return "-".join(w for w in words if w not in ("nvidia", "geforce", "tesla")) or "gpu"


def results_path(results: dict, args) -> Path:
    name = args.name or f"{gpu_slug(results.get('gpu'))}-{results['date']}{'-quick' if args.quick else ''}"
    return Path(args.out) / f"{name}.json"


def write_results(results: dict, path: str | Path) -> None:
    """Through a temporary file, so a reader (or a run killed meanwhile) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


def carry_over(previous: dict, results: dict, selected: list[str], kernel_files: list[str]) -> None:
    """--merge: what an earlier run into the same file measured in the stages not run now stays, so a
    run split over several calls (each under a time limit) still makes one results file. `calls` lists
    every call's command, commit and stages."""
    rerun = set(selected)
    if "tests" not in rerun:
        results["tests"] = previous.get("tests")
    if "kernels" not in rerun:
        results["kernels"] = previous.get("kernels", [])
    else:  # rows of the kernel files not run this time stay
        results["kernels"] = [row for row in previous.get("kernels", []) if row.get("file") not in kernel_files]
    if "checkpointing" not in rerun and "checkpointing" in previous:
        results["checkpointing"] = previous["checkpointing"]
    if "e2e" not in rerun:
        results["max_context"] = previous.get("max_context", [])
        if "e2e_config" in previous:
            results["e2e_config"] = previous["e2e_config"]
    kept = [row for row in previous.get("e2e", []) if merge_stage(row.get("case")) not in rerun]
    results["e2e"] = kept + results["e2e"]
    for key in ("e2e_skipped", "e2e_errors", "e2e_commands"):
        kept = [item for item in previous.get(key, []) if item.get("stage", "e2e") not in rerun]
        if kept or key in results:
            results[key] = kept + results.get(key, [])
    results["stages"] = {**{k: v for k, v in previous.get("stages", {}).items() if k not in rerun},
                         **results["stages"]}
    results["calls"] = previous.get("calls") or [_call(previous, list(previous.get("stages", {})))]
    results["calls"].append(_call(results, selected))


def _call(results: dict, stages: list[str]) -> dict:
    return {"command": results.get("command"), "git": results.get("git"), "started_at": results.get("started_at"),
            "stages": list(stages)}


def _git() -> dict:
    out = {}
    with contextlib.suppress(Exception):
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
        out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    return out


def new_results(args, argv) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    command = "python bench/run.py" + ("" if not argv else " " + shlex.join(argv))
    return {"schema": 1, "command": command, "date": now.strftime("%Y-%m-%d"),
            "started_at": now.isoformat(timespec="seconds"), "quick": args.quick, "git": _git(),
            "gpu": None, "torch": None, "triton": None, "transformers": None, "peft": None,
            "peak_bf16_tflops": None, "copy_bandwidth_gbs": None,
            "tokens_per_step": args.tokens_per_step, "stages": {},
            "tests": None, "kernels": [], "e2e": [], "max_context": []}

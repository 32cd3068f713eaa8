"""The kernels stage of bench/run.py: pytest bench/kernels (TRITON_INTERPRET=0), one process per file with an
even share of the time left; record_cases.py collects each case's extra_info as it finishes, made here
into results rows (op, system, shape, median_ms, tflops or gb_per_s, peak memory)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from pytest_counts import parse_junit
from stage_process import BENCH, HARNESS, gpu_env, overall, run_logged, status, tail

_MEASURED = ("median_ms", "tflops", "gb_per_s", "peak_mem_gb")


def kernel_case(line: dict) -> dict:
    """One results row from a plugin line: op, system, shape, the measured figures and the rest of extra_info."""
    info = dict(line.get("extra_info") or {})
    stem = line.get("file", "").removesuffix(".py").removeprefix("bench_")
    op = info.pop("op", None) or stem
    if "block" in info:
        op = f"{op}/{info.pop('block')}"
    row = {"op": op, "system": info.pop("system", "?"), "shape": str(info.pop("shape", line.get("name", "")))}
    for key in _MEASURED:
        row[key] = info.pop(key, None)
    if row["median_ms"] is None and line.get("benchmark_median_s") is not None:
        row["benchmark_median_ms"] = line["benchmark_median_s"] * 1e3  # smoke mode: one untimed-ish round
    row["name"] = line.get("name")
    row["file"] = line.get("file")
    row["info"] = info
    return row


def kernel_files(args) -> list[Path]:
    return [Path(f) for f in args.kernel_files or []] or sorted((BENCH / "kernels").glob("bench_*.py"))


def stage_kernels(results: dict, args, budget: float, work: Path) -> dict:
    files = kernel_files(args)
    jsonl = work / "kernels.jsonl"
    jsonl.unlink(missing_ok=True)
    env = gpu_env()
    env["LORAFUSE_BENCH_JSONL"] = str(jsonl)
    paths = [str(HARNESS), str(BENCH), os.environ.get("PYTHONPATH", "")]  # harness/: the plugin, -p record_cases
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    ends = time.monotonic() + budget
    per_file = {}
    for index, file in enumerate(files):
        # an even share of what is left, so every op gets measured; time a file leaves unused carries on
        timeout = (ends - time.monotonic()) / (len(files) - index)
        if timeout < 5:
            per_file[file.name] = {"status": "skipped: no time left"}
            continue
        junit = work / f"kernels-{file.stem}.xml"
        cmd = [sys.executable, "-m", "pytest", str(file), "-q", "-p", "no:cacheprovider", "-p", "record_cases",
               f"--junitxml={junit}"]
        res = run_logged(cmd, timeout, env=env, log_path=work / f"kernels-{file.stem}.log", echo=args.verbose)
        entry = {"status": status(res), "seconds": res["seconds"]}
        counts = parse_junit(junit) if not res["timed_out"] else None
        if counts:
            entry.update({k: counts[k] for k in ("passed", "failed", "errors", "skipped")})
            entry["failed_ids"] = counts["failed_ids"]
        if res["rc"] not in (0, 5) or res["timed_out"]:
            entry["output_tail"] = tail(res["output"], 2000)
        per_file[file.name] = entry
    lines = []
    if jsonl.is_file():
        for raw in jsonl.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
    results["kernels"] += [kernel_case(line) for line in lines if line.get("ok", True)]  # (--merge kept others)
    return {"status": overall(per_file), "files": per_file, "cases": len(lines)}

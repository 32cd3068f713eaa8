"""A pytest plugin for the kernels stage of bench/run.py (`-p record_cases`, with bench/harness on
PYTHONPATH): it appends every finished benchmark case to $LORAFUSE_BENCH_JSONL at once, so a benchmark
file that runs out of time keeps its finished cases."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def pytest_runtest_makereport(item, call):
    """After a benchmark case's call phase: one JSON line with its extra_info and pytest-benchmark's median."""
    path = os.environ.get("LORAFUSE_BENCH_JSONL")
    if not path or call.when != "call":
        return None
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is None:
        return None
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    line = {"nodeid": item.nodeid, "file": Path(str(item.fspath)).name, "name": item.name,
            "ok": call.excinfo is None, "extra_info": dict(getattr(bench, "extra_info", {}) or {}),
            "benchmark_median_s": getattr(stats, "median", None) if stats is not None else None}
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
    return None

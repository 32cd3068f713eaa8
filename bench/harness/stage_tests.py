"""The tests stage of bench/run.py: `pytest -m gpu tests` with compiled kernels (TRITON_INTERPRET=0), its
counts and failed ids in the results file."""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_counts import parse_junit, parse_verbose_output
from stage_process import gpu_env, run_logged, status, tail


def stage_tests(results: dict, args, budget: float, work: Path) -> dict:
    junit = work / "tests-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-p", "no:cacheprovider", "-rfE",
           f"--junitxml={junit}"]
    res = run_logged(cmd, budget, env=gpu_env(), log_path=work / "tests.log", echo=args.verbose)
    summary = parse_junit(junit) if not res["timed_out"] else None
    summary = summary or parse_verbose_output(res["output"] if not (work / "tests.log").is_file()
                                              else (work / "tests.log").read_text(errors="replace"))
    summary.update(status=status(res), seconds=res["seconds"],
                   command="TRITON_INTERPRET=0 python -m pytest -m gpu tests")
    if res["rc"] not in (0, 5) or res["timed_out"]:
        summary["output_tail"] = tail(res["output"])
    results["tests"] = summary
    return {"status": summary["status"], "seconds": res["seconds"]}

"""The static stage of bench/run.py (only with --with-static or --only static): `python -m lorafuse.kernels.aot
--report`, the registers, spills, shared memory and tensor-core shapes of every shipped kernel config at the
headline shapes, compiled for sm_80 and sm_90 (no GPU needed; on a GPU machine its many cores make it quick).
It writes bench/results/static-<date>.json and its markdown beside the GPU results; the results file records
where, and the totals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from stage_process import outcome, run_logged


def stage_static(results: dict, args, budget: float, work: Path) -> dict:
    out = Path(args.out)
    cmd = [sys.executable, "-m", "lorafuse.kernels.aot", "--report", "--out", str(out),
           "--jobs", str(max(1, min(16, os.cpu_count() or 1)))]
    env = {"TRITON_INTERPRET": "0"}
    res = run_logged(cmd, budget, env=env, log_path=work / "static.log", echo=args.verbose)
    written = [line.split("[static] ", 1)[1] for line in res["output"].splitlines()
               if line.startswith("[static] ") and line.endswith(".json")]
    if written and Path(written[-1]).is_file():
        data = json.loads(Path(written[-1]).read_text(encoding="utf-8"))
        measured = [v for v in data["variants"] if "registers" in v]
        results["static"] = {"file": written[-1], "variants": len(measured),
                             "spilling": sum(v["spill_bytes"] > 0 for v in measured),
                             "command": "python -m lorafuse.kernels.aot --report"}
    return outcome(res)

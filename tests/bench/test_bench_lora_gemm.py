"""bench/kernels/bench_lora_linear.py's two-path cases in smoke mode (CPU, the interpreter) write the choice file
that `auto` reads, and the paper estimate (bench/lora_gemm_roofline.py) is the one the selection code uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import lora_gemm_roofline as roofline  # noqa: E402

from lorafuse.kernels import _lora_gemm_select as select  # noqa: E402


def test_smoke_run_of_both_paths_records_the_choice_file(tmp_path):
    env = {**os.environ, "LORAFUSE_CACHE": str(tmp_path), "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    env.pop("LORAFUSE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "bench" / "kernels" / "bench_lora_linear.py"), "-k", "lora_gemm_paths or record"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "10 passed" in proc.stdout, proc.stdout[-2000:]
    recorded = json.loads((tmp_path / select.CHOICE_FILE).read_text())
    blocks = {rec["block"] for rec in recorded["cpu (smoke)"].values()}
    assert blocks == {"qkv", "o", "mlp"}
    assert all(rec.get("smoke") for rec in recorded["cpu (smoke)"].values())
    # smoke records carry no times, so `auto` never takes them for a measurement
    shapes = [(int(k.split("-")[1][1:]), int(k.split("-")[2][1:])) for k in recorded["cpu (smoke)"]]
    os.environ["LORAFUSE_CACHE"], before = str(tmp_path), os.environ.get("LORAFUSE_CACHE")
    try:
        assert select.measured_choice("cpu (smoke)", shapes) is None
    finally:
        if before is None:
            os.environ.pop("LORAFUSE_CACHE")
        else:
            os.environ["LORAFUSE_CACHE"] = before


def test_the_estimate_the_selection_falls_back_on():
    est = roofline.estimate(16384, 16)
    assert roofline.favoured() == select.ESTIMATE_FAVOURS
    assert est["bare"]["ratio"] == 1.0
    assert 1.0 < est["cublas"]["ratio"] < est["triton"]["ratio"]
    # the figure for today's path: four passes over x or dY, about 4.6 GB per layer
    assert abs(est["triton"]["extra_gb"] - 4.56) < 0.05
    assert "| cublas |" in roofline.table()

"""The one benchmark command (bench/run.py) on the CPU: its stages, the results file, --merge and its options."""

import json
from pathlib import Path

import pytest
import torch

from harness_utils import BENCH, HF_KEYS, TINY, load_script
from results_file import gpu_slug

bench_run = load_script("run")


def test_run_writes_results_with_the_required_keys(tmp_path, cpu_bench):
    """The one command's e2e and kernels stages (the GPU tests are not run here), on the CPU."""
    path = bench_run.main(["--only", "e2e", "kernels", "--quick", "--models", "tiny", "--tokens-per-step", "384",
                           "--kernel-files", str(BENCH / "kernels" / "bench_rope.py"), "--e2e-args",
                           " ".join(TINY[2:4] + TINY[6:]), "--out", str(tmp_path), "--logs", str(tmp_path / "logs"),
                           "--no-verbose"])
    results = json.loads(path.read_text())
    assert path == tmp_path / f"{gpu_slug(results['gpu'])}-{results['date']}-quick.json"
    for key in ("gpu", "torch", "triton", "transformers", "peft", "command", "date", "peak_bf16_tflops",
                "copy_bandwidth_gbs", "tests", "kernels", "e2e", "max_context", "stages"):
        assert key in results, key
    assert results["torch"] == torch.__version__ and results["command"].startswith("python bench/run.py --only")
    assert results["stages"]["env"]["status"] == "ok"
    assert results["stages"]["e2e"]["status"] == "ok", results["stages"]["e2e"]
    cases = {r["case"]: r for r in results["e2e"]}
    assert set(cases) == {"stock", "hf_packed", "hf_patched", "lorafuse-none", "lorafuse-recompute", "lorafuse-offload"}
    for row in results["e2e"]:
        assert all(key in row for key in HF_KEYS) and len(row["step_losses"]) == 4  # --quick: 1 + 3 steps
    assert {r["case"] for r in results["max_context"]} == {"stock", "lorafuse-recompute", "lorafuse-offload"}
    kernels = results["kernels"]
    assert {k["system"] for k in kernels} == {"copy", "lorafuse", "hf"} and all(k["op"] == "rope" for k in kernels)
    assert results["stages"]["kernels"]["files"]["bench_rope.py"]["passed"] == 3
    assert path.with_suffix(".md").is_file() and Path(f"{path.with_suffix('')}-e2e.png").is_file()

    # a second call (a time-limited machine) re-runs the kernels stage into the same file with --merge
    again = bench_run.main(["--only", "kernels", "--quick", "--merge", "--kernel-files",
                            str(BENCH / "kernels" / "bench_rms_norm.py"), "--out", str(tmp_path), "--logs",
                            str(tmp_path / "logs2"), "--no-verbose"])
    merged = json.loads(again.read_text())
    assert again == path
    assert merged["e2e"] == results["e2e"] and merged["max_context"] == results["max_context"]
    assert merged["stages"]["e2e"] == results["stages"]["e2e"]
    # the rope rows of the first call stay beside the new rms_norm rows (another file)
    assert {k["file"] for k in merged["kernels"]} == {"bench_rope.py", "bench_rms_norm.py"}
    assert [k for k in merged["kernels"] if k["file"] == "bench_rope.py"] == results["kernels"]
    assert [c["command"] for c in merged["calls"]] == [results["command"], merged["command"]]
    assert merged["calls"][1]["stages"] == ["env", "kernels"] and "--merge" in merged["command"]
    assert all(f"`{c['command']}`" in path.with_suffix(".md").read_text() for c in merged["calls"])


def test_a_stage_budget_can_be_set_and_a_bad_one_is_refused(tmp_path, capsys):
    path = bench_run.main(["--only", "kernels", "--quick", "--stage-budget", "kernels=123", "--kernel-files",
                           str(BENCH / "kernels" / "bench_rope.py"), "--out", str(tmp_path), "--no-verbose",
                           "--no-report"])
    assert json.loads(path.read_text())["stages"]["kernels"]["budget_s"] == 123
    for bad in ("e2e=100", "tests=soon", "tests=-5", "tests=nan", "tests=inf"):
        with pytest.raises(SystemExit):
            bench_run.parse_args(["--stage-budget", bad])
        assert "--stage-budget" in capsys.readouterr().err

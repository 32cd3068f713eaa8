"""The one-command runner (bench/run.py) and the report (bench/report.py) on the CPU, and benchutil.measure
with the CUDA calls faked."""

import json
from pathlib import Path

import pytest
import torch
from harness_utils import BENCH, HF_KEYS, TINY, load_script

bench_run = load_script("run")
report = load_script("report")


# ---------------------------------------------------------------------------------------------
# run.py
# ---------------------------------------------------------------------------------------------


def test_run_writes_results_with_the_required_keys(tmp_path, cpu_bench):
    """The one command's e2e and kernels stages (the GPU tests are not run here), on the CPU."""
    path = bench_run.main(["--only", "e2e", "kernels", "--quick", "--models", "tiny", "--tokens-per-step", "384",
                           "--kernel-files", str(BENCH / "kernels" / "bench_rope.py"), "--e2e-args",
                           " ".join(TINY[2:4] + TINY[6:]), "--out", str(tmp_path), "--logs", str(tmp_path / "logs"),
                           "--no-verbose"])
    results = json.loads(path.read_text())
    assert path == tmp_path / f"{bench_run.gpu_slug(results['gpu'])}-{results['date']}-quick.json"
    for key in ("gpu", "torch", "triton", "transformers", "peft", "command", "date", "peak_bf16_tflops",
                "copy_bandwidth_gbs", "tests", "kernels", "e2e", "max_context", "stages"):
        assert key in results, key
    assert results["torch"] == torch.__version__ and results["command"].startswith("python bench/run.py --only")
    assert results["stages"]["env"]["status"] == "ok"
    assert results["stages"]["e2e"]["status"] == "ok", results["stages"]["e2e"]
    cases = {r["case"]: r for r in results["e2e"]}
    assert set(cases) == {"stock", "hf_packed", "lorafuse-none", "lorafuse-recompute", "lorafuse-offload"}
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


def test_merge_keeps_the_stages_not_run_again():
    previous = {"command": "python bench/run.py --only e2e", "git": {"commit": "aaa"}, "tests": {"passed": 3},
                "kernels": [{"op": "rope", "file": "bench_rope.py"}, {"op": "old", "file": "bench_rms_norm.py"}],
                "e2e": [{"case": "stock", "v": 1}, {"case": "liger", "v": 1}], "max_context": [{"case": "stock"}],
                "e2e_skipped": [{"case": "hf_packed", "stage": "e2e"}, {"case": "liger", "stage": "peers"}],
                "e2e_commands": [{"stage": "e2e", "command": "e2e.py stock"}, {"stage": "peers", "command": "x"}],
                "stages": {"env": {"status": "old"}, "e2e": {"status": "ok"}, "peers": {"status": "ok"}}}
    results = {"command": "python bench/run.py --only peers kernels --merge", "git": {"commit": "bbb"},
               "tests": None, "kernels": [], "e2e": [], "max_context": [], "stages": {"env": {"status": "ok"}}}
    bench_run.carry_over(previous, results, ["env", "kernels", "peers"], ["bench_rms_norm.py"])
    assert results["tests"] == {"passed": 3}
    assert results["kernels"] == [{"op": "rope", "file": "bench_rope.py"}]  # rms_norm runs again
    assert results["e2e"] == [{"case": "stock", "v": 1}]  # the liger row goes: peers run again
    assert results["max_context"] == [{"case": "stock"}]
    assert results["e2e_skipped"] == [{"case": "hf_packed", "stage": "e2e"}]
    assert results["e2e_commands"] == [{"stage": "e2e", "command": "e2e.py stock"}]
    assert results["stages"] == {"env": {"status": "ok"}, "e2e": {"status": "ok"}}
    assert [(c["command"], c["git"]["commit"]) for c in results["calls"]] == \
        [(previous["command"], "aaa"), (results["command"], "bbb")]


def test_test_counts_from_junit_and_from_verbose_output(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
                     '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
                     "</testsuite></testsuites>")
    counts = bench_run.parse_junit(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["total"]) == (1, 1, 1, 3)
    assert counts["failed_ids"] == ["tests.test_a::test_bad"]
    text = ("tests/test_a.py::test_ok PASSED [ 33%]\ntests/test_a.py::test_bad[x] FAILED [ 66%]\n"
            "tests/test_b.py::test_skip SKIPPED (needs a GPU) [100%]\n")
    counts = bench_run.parse_verbose_output(text)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert bench_run.parse_junit(tmp_path / "missing.xml") is None
    assert bench_run.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert bench_run.gpu_slug("NVIDIA H200") == "h200" and bench_run.gpu_slug(None) == "cpu"


# ---------------------------------------------------------------------------------------------
# report.py
# ---------------------------------------------------------------------------------------------


def _row(case, tokens_per_s, peak, mfu, losses, **extra):
    system = "lorafuse" if case.startswith("lorafuse") else case
    return {"model": "llama-3.1-8b", "system": system, "case": case, "tokens_per_step": 16384,
            "tokens_per_s": tokens_per_s, "step_time_s": 16384 / tokens_per_s if tokens_per_s else None,
            "peak_mem_gb": peak, "mfu": mfu, "step_losses": losses, "oom": False, **extra}


def synthetic_results() -> dict:
    losses = [11.9, 11.85, 11.8]
    kernel = lambda op, system, ms, **kw: {"op": op, "system": system, "shape": "16384x4096", "median_ms": ms,
                                           "tflops": None, "gb_per_s": 1000 / ms, "peak_mem_gb": 1.0,
                                           "info": {"dtype": "bfloat16", **kw}}
    return {
        "schema": 1, "gpu": "NVIDIA H100 80GB HBM3", "date": "2025-01-31", "started_at": "2025-01-31T10:00:00+00:00",
        "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.1.0", "peft": "0.18.0", "cuda": "13.0",
        "command": "python bench/run.py", "peak_bf16_tflops": 780.0,
        "copy_bandwidth_gbs": {"h2d_pinned": 50.1, "d2h_pinned": 51.2, "d2d": 2900.0},
        "tests": {"passed": 20, "failed": 1, "errors": 0, "skipped": 0, "failed_ids": ["tests/test_x.py::test_y"],
                  "status": "failed (rc 1)", "seconds": 80.0},
        "e2e": [_row("stock", 1000.0, 60.0, 0.2, losses),
                _row("lorafuse-none", 3500.0, 20.0, 0.55, [x + 1e-3 for x in losses]),
                _row("lorafuse-recompute", 3000.0, 18.0, 0.5, losses),
                _row("lorafuse-offload", 2800.0, 15.0, 0.45, losses),
                _row("liger", None, None, None, [], oom=True, oom_at_step=1),
                _row("hf_packed", None, None, None, [], error="no result: timed out")],
        "max_context": [{"model": "llama-3.1-8b", "system": "stock", "case": "stock", "largest_tokens": 20480,
                         "first_failure": 21504, "limited_by": "memory"},
                        {"model": "llama-3.1-8b", "system": "lorafuse", "case": "lorafuse-recompute",
                         "largest_tokens": 131072, "first_failure": None, "limited_by": "time"}],
        "kernels": [kernel("rms_norm", "lorafuse", 0.5), kernel("rms_norm", "torch", 1.0),
                    kernel("rope", "lorafuse", 0.2), kernel("rope", "hf", 0.7), kernel("rope", "copy", 0.1)],
        "stages": {"env": {"status": "ok", "seconds": 20.0}, "e2e": {"status": "ok", "seconds": 300.0}},
    }


def test_report_writes_tables_and_plots(tmp_path):
    path = tmp_path / "h100-80gb-hbm3-2025-01-31.json"
    path.write_text(json.dumps(synthetic_results()))
    written = report.main([str(path)])
    md = written["md"].read_text()
    assert "| lorafuse-none | 3,500 | 3.50× |" in md
    assert "| stock | 1,000 | 1.00× |" in md and "OOM (step 1)" in md and "error: no result: timed out" in md
    assert "33%" in md  # lorafuse-none's peak memory relative to stock (20 / 60) in the goals table
    assert "≥ 131,072" in md and "≥ 6.4×" in md  # a time-limited search is a lower bound
    assert "**rms_norm**" in md and "2.00×" in md and "3.50×" in md
    assert "1 failed" in md and "`python bench/run.py`" in md and "NVIDIA H100 80GB HBM3" in md
    for png in (written["e2e_png"], written["kernels_png"]):
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["e2e_png"].name == "h100-80gb-hbm3-2025-01-31-e2e.png"


def test_readme_section_is_replaced_between_the_markers_and_idempotent(tmp_path):
    results_dir = tmp_path / "bench" / "results"
    results_dir.mkdir(parents=True)
    older = synthetic_results() | {"started_at": "2024-12-01T00:00:00+00:00", "gpu": "NVIDIA A100"}
    (results_dir / "a100-2024-12-01.json").write_text(json.dumps(older))
    (results_dir / "h100-80gb-hbm3-2025-01-31.json").write_text(json.dumps(synthetic_results()))
    readme = tmp_path / "README.md"
    readme.write_text("# lorafuse\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nfooter\n")
    written = report.main([str(results_dir), "--readme", str(readme)])  # a folder: its newest results
    assert written["readme_changed"] is True
    text = readme.read_text()
    assert text.startswith("# lorafuse\n\nintro\n\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\nfooter\n")
    assert "old table" not in text and "NVIDIA H100 80GB HBM3" in text and "A100" not in text
    assert "| lorafuse-none | 3,500 | 3.50× |" in text
    assert "(bench/results/h100-80gb-hbm3-2025-01-31-e2e.png)" in text
    assert "```\npython bench/run.py\n```" in text
    assert report.main([str(results_dir), "--readme", str(readme)])["readme_changed"] is False
    assert readme.read_text() == text
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.main([str(results_dir / "h100-80gb-hbm3-2025-01-31.json"), "--readme", str(bare)])


# ---------------------------------------------------------------------------------------------
# benchutil.measure, its GPU path with the CUDA calls faked (no GPU here)
# ---------------------------------------------------------------------------------------------


class FakeBenchmark:
    def __init__(self):
        self.extra_info, self.rounds = {}, 0

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        for _ in range(rounds + warmup_rounds):
            fn()
            self.rounds += 1


@pytest.fixture
def gpu_measure(monkeypatch):
    """benchutil in its GPU mode over a fake allocator: each run allocates 3 GiB above 1 GiB of inputs."""
    import triton.testing

    benchutil = load_script("benchutil")
    monkeypatch.setattr(benchutil, "SMOKE", False)
    state = {"allocated": 1 << 30, "peak": 5 << 30, "runs": 0}  # a stale peak from an earlier case

    def run():
        state["runs"] += 1
        state["peak"] = max(state["peak"], state["allocated"] + (3 << 30))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **k: (fn(), 2.0)[1])
    return benchutil, run, state


def test_measure_reads_the_peak_after_a_reset_and_records_rates(gpu_measure):
    benchutil, run, state = gpu_measure
    bench = FakeBenchmark()
    ms = benchutil.measure(bench, run, flops=4e12, bytes_moved=6e9, system="lorafuse", shape="N8")
    assert ms == 2.0 and bench.extra_info["median_ms"] == 2.0
    assert bench.extra_info["tflops"] == pytest.approx(2000.0) and bench.extra_info["gb_per_s"] == pytest.approx(3000.0)
    assert bench.extra_info["peak_mem_gb"] == pytest.approx(4.0)  # not the stale 5 GiB
    assert bench.extra_info["peak_above_inputs_gb"] == pytest.approx(3.0)
    assert bench.extra_info["system"] == "lorafuse" and bench.rounds == 3


def test_measure_turns_out_of_memory_into_a_skip(gpu_measure):
    benchutil, _, _ = gpu_measure

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(pytest.skip.Exception, match=r"eager ran out of GPU memory at N32768 \(oom\)"):
        benchutil.measure(FakeBenchmark(), oom, system="eager", shape="N32768")


def test_a_stage_budget_can_be_set_and_a_bad_one_is_refused(tmp_path, capsys):
    path = bench_run.main(["--only", "kernels", "--quick", "--stage-budget", "kernels=123", "--kernel-files",
                           str(BENCH / "kernels" / "bench_rope.py"), "--out", str(tmp_path), "--no-verbose",
                           "--no-report"])
    assert json.loads(path.read_text())["stages"]["kernels"]["budget_s"] == 123
    for bad in ("e2e=100", "tests=soon", "tests=-5", "tests=nan", "tests=inf"):
        with pytest.raises(SystemExit):
            bench_run.parse_args(["--stage-budget", bad])
        assert "--stage-budget" in capsys.readouterr().err

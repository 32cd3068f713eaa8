"""The report (bench/report.py) of a synthetic results file: tables, plots, and the README's section."""

import json

import pytest

from harness_utils import load_script

report = load_script("report")


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

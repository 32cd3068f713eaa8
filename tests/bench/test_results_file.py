"""The results file of bench/run.py (bench/harness/results_file.py): --merge keeps what is not run again."""

from results_file import carry_over


def test_merge_keeps_the_stages_not_run_again():
    previous = {"command": "python bench/run.py --only e2e", "git": {"commit": "aaa"}, "tests": {"passed": 3},
                "kernels": [{"op": "rope", "file": "bench_rope.py"}, {"op": "old", "file": "bench_rms_norm.py"}],
                "e2e": [{"case": "stock", "v": 1}, {"case": "liger", "v": 1}], "max_context": [{"case": "stock"}],
                "e2e_skipped": [{"case": "hf_packed", "stage": "e2e"}, {"case": "liger", "stage": "peers"}],
                "e2e_commands": [{"stage": "e2e", "command": "e2e.py stock"}, {"stage": "peers", "command": "x"}],
                "stages": {"env": {"status": "old"}, "e2e": {"status": "ok"}, "peers": {"status": "ok"}}}
    results = {"command": "python bench/run.py --only peers kernels --merge", "git": {"commit": "bbb"},
               "tests": None, "kernels": [], "e2e": [], "max_context": [], "stages": {"env": {"status": "ok"}}}
    carry_over(previous, results, ["env", "kernels", "peers"], ["bench_rms_norm.py"])
    assert results["tests"] == {"passed": 3}
    assert results["kernels"] == [{"op": "rope", "file": "bench_rope.py"}]  # rms_norm runs again
    assert results["e2e"] == [{"case": "stock", "v": 1}]  # the liger row goes: peers run again
    assert results["max_context"] == [{"case": "stock"}]
    assert results["e2e_skipped"] == [{"case": "hf_packed", "stage": "e2e"}]
    assert results["e2e_commands"] == [{"stage": "e2e", "command": "e2e.py stock"}]
    assert results["stages"] == {"env": {"status": "ok"}, "e2e": {"status": "ok"}}
    assert [(c["command"], c["git"]["commit"]) for c in results["calls"]] == \
        [(previous["command"], "aaa"), (results["command"], "bbb")]

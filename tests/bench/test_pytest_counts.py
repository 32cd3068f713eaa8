"""Counts of a pytest run (bench/harness/pytest_counts.py), and the GPU's name in the results file's name."""

from pytest_counts import parse_junit, parse_verbose_output
from results_file import gpu_slug


def test_test_counts_from_junit_and_from_verbose_output(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
                     '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
                     "</testsuite></testsuites>")
    counts = parse_junit(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["total"]) == (1, 1, 1, 3)
    assert counts["failed_ids"] == ["tests.test_a::test_bad"]
    text = ("tests/test_a.py::test_ok PASSED [ 33%]\ntests/test_a.py::test_bad[x] FAILED [ 66%]\n"
            "tests/test_b.py::test_skip SKIPPED (needs a GPU) [100%]\n")
    counts = parse_verbose_output(text)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert parse_junit(tmp_path / "missing.xml") is None
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug("NVIDIA H200") == "h200" and gpu_slug(None) == "cpu"

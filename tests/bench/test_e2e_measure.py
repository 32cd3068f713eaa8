"""Measuring one case of the end-to-end benchmark (bench/harness/e2e_measure.py)."""

from e2e_data import single_document
from e2e_measure import measure_case
from harness_utils import FakeRunner


def test_out_of_memory_is_a_result_not_a_crash():
    steps = [[single_document(n, 256, seed=0)] for n in (100, 300, 100)]
    runner = FakeRunner(200)
    runner.flops = lambda doc_lengths: 1.0
    row = measure_case(runner, steps, warmup=1, peak_flops=None, log=lambda *_: None)
    assert row["oom"] is True and row["oom_at_step"] == 2 and row["step_losses"] == [1.0]
    assert runner.failures == 1

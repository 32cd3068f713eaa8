"""benchutil.measure, its GPU path with the CUDA calls faked (no GPU here)."""

import pytest
import torch

from harness_utils import load_script


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

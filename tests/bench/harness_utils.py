"""Helpers shared by the benchmark-harness tests: the bench scripts loaded by path, the tiny CPU model's
e2e arguments, the keys every e2e row has, and a runner that runs out of memory on cue."""

import importlib.util
import sys
from pathlib import Path

import torch

from e2e_runner import Prepared

BENCH = Path(__file__).resolve().parents[2] / "bench"
TINY = ["--model", "tiny", "--device", "cpu", "--tokens-per-step", "384", "--doc-median", "40", "--doc-max", "160",
        "--max-context-start", "64", "--max-context-step", "32", "--max-context-limit", "256"]
HF_KEYS = ("model", "system", "tokens_per_step", "tokens_per_s", "step_time_s", "peak_mem_gb", "mfu",
           "step_losses", "oom")


def load_script(name):
    """bench/<name>.py loaded by path, fresh, as lorafuse_bench_<name>: `run` and `report` never become
    top-level modules of the test session."""
    spec = importlib.util.spec_from_file_location(f"lorafuse_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class FakeRunner:
    """Runs out of memory above `fits` tokens (the search logic without a GPU)."""

    cuda, device, case = False, torch.device("cpu"), "fake"

    def __init__(self, fits: int):
        self.fits, self.failures = fits, 0

    def prepare(self, docs):
        n = sum(len(d) for d in docs)
        return Prepared([n], n - len(docs), n, n)

    def step(self, prep):
        if prep.useful_tokens > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.tensor(1.0)

    def flops(self, doc_lengths):
        return float(sum(doc_lengths))

    def after_failure(self):
        self.failures += 1

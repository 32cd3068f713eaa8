"""Setup of the benchmark-harness tests: bench/harness/ on the path (its modules import each other by
plain name, as the bench scripts arrange), and the fixture that keeps whole-model runs on the CPU fast."""

import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "harness"
if str(HARNESS) not in sys.path:
    sys.path.insert(0, str(HARNESS))


@pytest.fixture
def cpu_bench(monkeypatch):
    """Reference kernels (the interpreter is far too slow for whole models), no C++ extension build."""
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    monkeypatch.setenv("LORAFUSE_EXTENSION", "0")

"""Kernel micro-benchmarks (pytest-benchmark); see benchutil.py for the two modes.

Without a GPU, Triton's interpreter runs the smoke cases, so TRITON_INTERPRET=1 is set here
before anything imports triton (unless the caller chose).
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from benchutil import GPU  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if GPU else "cpu"


@pytest.fixture
def dtype():
    return torch.bfloat16 if GPU else torch.float32

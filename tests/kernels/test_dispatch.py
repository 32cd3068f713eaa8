"""Kernel selection (DESIGN.md, "Kernel selection"): which implementation a call runs, and the
clear errors when the environment cannot run what was asked for."""

import pytest
import torch

from lorafuse.kernels import _dispatch


def test_cpu_tensors_run_the_interpreter_when_it_was_on_at_import(monkeypatch):
    monkeypatch.delenv("LORAFUSE_KERNELS", raising=False)
    assert _dispatch.INTERPRETED  # tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported
    assert _dispatch.use_triton(torch.zeros(1))


def test_reference_mode_and_interpreter_off_run_the_reference(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    assert not _dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("LORAFUSE_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("LORAFUSE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA, or TRITON_INTERPRET=1"):
        _dispatch.use_triton(torch.zeros(1))


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, reference or triton; got 'fast'"):
        _dispatch.use_triton(torch.zeros(1))


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.0", True),
    ("3.6.0", "2.5.2", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.0", False),
    ("3.9.0", "2.4.6", False),
    ("3.10.0+git1234", "2.4.0rc1", False),
    ("3.6.0+gitabc", "2.4.0rc1", True),
    ("3.6rc1", "2.4.0", True),
    ("3.7a2", "2.4", False),
    ("3", "2.4.0", True),
])
def test_interpreter_version_clash_is_named(triton_version, numpy_version, broken):
    problem = _dispatch.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert triton_version in problem and "numpy<2.4 or triton>=3.7" in problem


def test_interpreter_version_clash_stops_the_call_with_the_fix(monkeypatch):
    monkeypatch.delenv("LORAFUSE_KERNELS", raising=False)
    monkeypatch.setattr(_dispatch, "INTERPRETER_PROBLEM", "Triton 3.6.0's interpreter does not work with numpy")
    with pytest.raises(RuntimeError, match="does not work with numpy"):
        _dispatch.use_triton(torch.zeros(1))

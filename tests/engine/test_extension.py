"""The offload extension (engine/extension.py): it builds into its cache once and is reused, and the
CUDA sources compile with nvcc (syntax and headers; no GPU needed). What the arena it provides
does is tested in activations/test_arena.py, against its pure-PyTorch twin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lorafuse.engine import extension as ext

ROOT = Path(ext.__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def test_extension_builds_into_cache_and_is_reused(extension):
    cache = Path(os.environ["LORAFUSE_CACHE"]) / "ext"
    assert extension.is_file() and cache in extension.parents
    mtime = extension.stat().st_mtime_ns
    started = time.perf_counter()
    assert ext.build_extension() == extension  # cache hit: no CMake run
    assert time.perf_counter() - started < 1.0 and extension.stat().st_mtime_ns == mtime
    assert "extension loaded from" in ext.extension_status()
    assert torch.ops.lorafuse.has_cuda() is False or torch.version.cuda is not None


def test_cuda_runtime_source_compiles_with_nvcc(tmp_path):
    """The CUDA-runtime-only file needs nvcc alone (no CUDA build of torch)."""
    nvcc = ext._find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    source = ROOT / "csrc" / "cuda_runtime_ops.cu"
    command = [nvcc, "-arch=sm_90", "-std=c++17", "-c", str(source), "-o", str(tmp_path / "ops.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cuda_glue_compiles_against_torch_cuda_headers():
    """offload_arena.cpp with LORAFUSE_WITH_CUDA, syntax-checked against torch's c10/cuda headers and
    the toolkit's cuda_runtime.h (a CPU torch ships those headers but no CUDA libraries to link)."""
    nvcc = ext._find_nvcc()
    compiler = shutil.which("c++") or shutil.which("g++")
    if nvcc is None or compiler is None:
        pytest.skip("needs nvcc (for the CUDA headers) and a host C++ compiler")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent,
             "/usr/local/cuda"]
    includes = [Path(root) / "include" for root in roots if root]
    cuda_include = next((path for path in includes if (path / "cuda_runtime.h").is_file()), None)
    torch_include = Path(torch.utils.cmake_prefix_path).parent.parent / "include"
    if cuda_include is None or not (torch_include / "c10" / "cuda").is_dir():
        pytest.skip("CUDA or torch c10/cuda headers not found")
    command = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-DLORAFUSE_WITH_CUDA=1",
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",  # the generated macros file exists only in CUDA builds
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
               "-I", str(ROOT / "csrc"), "-isystem", str(torch_include),
               "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"),
               "-isystem", str(cuda_include),
               str(ROOT / "csrc" / "offload_arena.cpp")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

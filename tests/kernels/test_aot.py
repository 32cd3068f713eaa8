"""Every Triton kernel compiles for sm_80 and sm_90 (no GPU needed: Triton compiles ahead of time)."""

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_a100_and_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lorafuse.kernels.aot"], env=env, capture_output=True, text=True,
                          timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_every_attention_block_divides_its_tile():
    """The causal passes of varlen attention split at tile boundaries; a block that straddled one would
    count a block of rows twice (dK/dV) or skip the mask (forward, dQ)."""
    va = importlib.import_module("lorafuse.kernels.varlen_attention")  # the package exports a function of that name
    for arch, tiles in va.TILES.items():
        for dim, (query_tile, key_tile) in tiles.items():
            assert all(query_tile % block == 0 for block, _, _ in va._FWD_OPTIONS[arch][dim]), (arch, dim)
            assert all(query_tile % block == 0 for block, _, _ in va._DQ_OPTIONS[arch][dim]), (arch, dim)
            assert all(key_tile % block == 0 for block, _, _ in va._DKDV_OPTIONS[arch][dim]), (arch, dim)


STRADDLING_BLOCK = """
import importlib, sys
import triton
from triton.compiler.errors import CompileTimeAssertionFailure
from lorafuse.kernels import aot
from lorafuse.kernels._launch import aot_spec
va = importlib.import_module("lorafuse.kernels.varlen_attention")
spec = aot_spec(va._varlen_bwd_dkdv_kernel, "bf16", dict(HEAD_DIM=256, HEAD_DIM_PAD=256, TILE=32, CAUSAL=True),
                types=va._AOT_TYPES, config=triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2))
try:
    aot.compile_spec(spec, 90)
except CompileTimeAssertionFailure as e:
    print("refused:", str(e).splitlines()[-1])
    sys.exit(0)
sys.exit("compiled a dK/dV config whose query block straddles the key tile")
"""


def test_a_block_straddling_the_tile_is_refused_at_compile_time():
    """So the autotuner drops such a config (it skips configs that fail a static assert)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", STRADDLING_BLOCK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "must divide the key tile" in proc.stdout

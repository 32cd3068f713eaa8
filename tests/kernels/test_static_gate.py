"""The static gate: no shipped config spills registers or needs more shared memory than the GPU has.

`python -m lorafuse.kernels.aot --gate` records the launches of a training step at the headline shapes on meta
tensors (Llama-3.1-8B at 16,384 tokens, LoRA r=16, bf16; a Gemma-2 local layer for head dim 256, window, softcap and
GeGLU; Llama-3.2-1B's attention for head dim 64), compiles every config of each launch's autotune list for sm_80 and
sm_90 as the launcher would (integers divisible by 16 and unit strides specialised), and reads ptxas's register,
spill and shared-memory figures. No GPU needed: Triton compiles ahead of time. 256 variants: 197 s on two lightly
loaded cores with Triton's cache empty (--jobs 2), hence `slow`; it still runs in `make test`. Since the merge of
main (the rank map, float32 masters, rope's COPY_V, the cuBLAS path's producers) 290 variants: 75 s with a warm
cache (--jobs 1); with head dim 64's attention and the residual GEMM epilogue 321.
"""

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_no_shipped_config_spills_or_overflows_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lorafuse.kernels.aot", "--gate", "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=1800)
    failing = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failing, "\n".join(failing[:40]) + proc.stdout[-2000:] + proc.stderr[-3000:]
    assert " variant(s), 0 failure(s)" in proc.stdout


def test_the_gate_reads_spills_and_tensor_core_shapes_from_ptxas():
    """The figures the gate checks come from ptxas's own log and the SASS, parsed as they print them."""
    static = importlib.import_module("lorafuse.kernels.aot_static")
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    4728 bytes stack frame, 4992 bytes spill stores, 5108 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 98304 bytes smem")
    assert static.parse_ptxas(log) == {"registers": 255, "stack_bytes": 4728, "spill_stores": 4992,
                                       "spill_loads": 5108}
    assert static.parse_ptxas("nothing compiled") is None
    assert static._shape_name("HGMMA.64x128x16.F32.BF16") == "wgmma m64n128k16"
    assert static._shape_name("HMMA.16816.F32.BF16") == "mma m16n8k16"
    assert static._shape_name("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma m64n64k16"
    # registers limit blocks per SM: 255 registers x 256 threads leave room for one block on either GPU
    assert static.ctas_per_sm(90, 255, 8, 98304) == 1
    assert static.ctas_per_sm(80, 128, 4, 49152) == 3


def test_autotune_lists_follow_the_gpu_architecture(monkeypatch):
    """An sm_80 GPU tries the sm_80 list, an sm_90 one the sm_90 list (the configs the gate compiled for each)."""
    launch = importlib.import_module("lorafuse.kernels._launch")
    lora = importlib.import_module("lorafuse.kernels.lora_linear")
    attention = importlib.import_module("lorafuse.kernels.varlen_attention")
    for tuner in (lora._tuned_main, lora._tuned_glu, attention._TUNED_DKDV[128], attention._TUNED_FWD[256]):
        for arch in (80, 90):
            monkeypatch.setattr(launch, "ASSUMED_ARCH", arch)
            kept = tuner.early_config_prune(tuner.configs, {})
            assert [id(c) for c in kept] == [id(c) for c in tuner.arch_configs[arch]]
    assert lora._tuned_main.arch_configs[80] != lora._tuned_main.arch_configs[90]  # sm_80 drops 4-warp 128-row tiles
    monkeypatch.setattr(launch, "ASSUMED_ARCH", 80)
    assert attention._tiles(128) in ((32, 64), attention.TILES[80][128])  # the interpreter's tiles, else sm_80's


def test_spilling_tiles_are_left_out_per_variant_and_architecture(monkeypatch):
    """The tiles the gate found spilling in one variant on one GPU (lora_linear._SPILLING, rope's COPY_V tile) are
    not tried there, the others are, and every variant keeps at least one config."""
    launch = importlib.import_module("lorafuse.kernels._launch")
    lora = importlib.import_module("lorafuse.kernels.lora_linear")
    rope = importlib.import_module("lorafuse.kernels.rope")
    cases = [(lora._tuned_main, {}, {"MAP_LOWRANK": True}, "map_lowrank"),
             (lora._tuned_main, {"stride_fn": 1}, {"HAS_LOWRANK": True, "NUM_SEGS": 1}, "dx"),
             (lora._tuned_main, {"stride_fn": 1}, {"HAS_LOWRANK": True, "NUM_SEGS": 3}, "dx3"),
             (lora._tuned_skinny, {}, {"MAP_SEGMENTS": True, "NUM_SEGS": 3}, "map_segments")]
    for arch in (80, 90):
        monkeypatch.setattr(launch, "ASSUMED_ARCH", arch)
        for tuner, named, flags, variant in cases:
            every = tuner.early_config_prune(tuner.configs, {})
            kept = tuner.early_config_prune(tuner.configs, named, **flags)
            spilling = lora._SPILLING.get((arch, variant), set())
            assert kept and [lora._tile(c) for c in kept] == [lora._tile(c) for c in every
                                                               if lora._tile(c) not in spilling]
        named = {"n_q_heads": 32, "n_kv_heads": 8}
        kept = rope._prune_rope_configs(rope._ROPE_CONFIGS, named, BLOCK_HALF=64, COPY_V=True)
        tiles = {(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_H"], c.num_warps) for c in kept}
        assert kept and ((2, 16, 4) in tiles) == (arch == 80)

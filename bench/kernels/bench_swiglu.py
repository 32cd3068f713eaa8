"""SwiGLU h = silu(g) * u, forward and forward + backward, bf16, at Llama-3.1-8B's MLP: 16k tokens x 14336;
and GeGLU h = gelu_tanh(g) * u (Gemma's MLP), forward + backward at the same size.

Peers in one process: lorafuse's swiglu / geglu (Triton); eager PyTorch, F.silu(g) * u and
F.gelu(g, approximate="tanh") * u; Liger-Kernel's LigerSiLUMulFunction / LigerGELUMulFunction (skipped when
liger_kernel does not import). g and u are separate contiguous
tensors, the layout every peer takes (Liger's kernel assumes one row stride for its inputs and output).
The backward step runs the forward and torch.autograd.grad of g and u, so nothing accumulates.

bytes_moved is the minimum traffic of the fused op, the same figure for every peer, so gb_per_s compares
across peers and with the `copy` case (g.clone(): one read and one write), which measures the bandwidth
the GPU delivers in this run: roofline fraction = gb_per_s(case) / gb_per_s(copy).
  forward:            reads g, u, writes h                        -> 3 T I e
  forward + backward: the forward, then reads dh, g, u, writes dg, du -> 8 T I e
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafuse.kernels import geglu, swiglu

from benchutil import SMOKE, measure

# smoke: two column blocks of the kernel, the second partial
TOKENS, INTER = (8, 1029) if SMOKE else (16384, 14336)


def _glu_of(system: str, op: str = "swiglu"):
    """The peer's h = silu(g) * u (op "swiglu") or gelu_tanh(g) * u (op "geglu") as a callable (g, u) -> h."""
    if system == "lorafuse":
        return {"swiglu": swiglu, "geglu": geglu}[op]
    if system == "eager":
        if op == "geglu":
            return lambda g, u: F.gelu(g, approximate="tanh") * u
        return lambda g, u: F.silu(g) * u
    if system == "liger":
        if SMOKE:
            pytest.skip("liger is only timed on a GPU (smoke mode runs the cheap peers once)")
        pytest.importorskip("liger_kernel")
        if op == "geglu":
            from liger_kernel.ops.geglu import LigerGELUMulFunction

            return LigerGELUMulFunction.apply
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    raise ValueError(system)


def _info(system, direction, dtype, op="swiglu"):
    return dict(system=system, shape=f"{TOKENS}x{INTER}", dtype=str(dtype).removeprefix("torch."), op=op,
                direction=direction)


@pytest.mark.parametrize("system", ["copy", "lorafuse", "eager", "liger"])
def test_swiglu_fwd(benchmark, system, device, dtype):
    elem = torch.finfo(dtype).bits // 8
    g = torch.randn(TOKENS, INTER, device=device, dtype=dtype)
    if system == "copy":
        measure(benchmark, g.clone, bytes_moved=2 * g.numel() * elem, **_info(system, "fwd", dtype))
        return
    act = _glu_of(system)
    u = torch.randn_like(g)
    step = lambda: act(g, u)
    if not SMOKE:
        step()  # compile outside the timing
    measure(benchmark, step, bytes_moved=3 * g.numel() * elem, **_info(system, "fwd", dtype))


def _fwd_bwd(benchmark, system, device, dtype, op):
    act = _glu_of(system, op)
    elem = torch.finfo(dtype).bits // 8
    g = torch.randn(TOKENS, INTER, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    dh = torch.randn_like(g)

    def step():
        torch.autograd.grad(act(g, u), (g, u), dh)

    if not SMOKE:
        step()  # compile outside the timing
    measure(benchmark, step, bytes_moved=8 * g.numel() * elem, **_info(system, "fwd+bwd", dtype, op))


@pytest.mark.parametrize("system", ["lorafuse", "eager", "liger"])
def test_swiglu_fwd_bwd(benchmark, system, device, dtype):
    _fwd_bwd(benchmark, system, device, dtype, "swiglu")


@pytest.mark.parametrize("system", ["lorafuse", "eager", "liger"])
def test_geglu_fwd_bwd(benchmark, system, device, dtype):
    _fwd_bwd(benchmark, system, device, dtype, "geglu")

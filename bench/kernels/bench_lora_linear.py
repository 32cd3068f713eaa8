"""Fused LoRA linear, grouped q/k/v and the LoRA MLP: forward + backward, bf16, Llama-3.1-8B shapes.

Peers in the same run, per shape and token count:
- lorafuse: the Triton kernels (lora_linear, lora_linear_group, lora_mlp);
- base: the bare frozen layer, forward + dX only (no LoRA at all): the floor;
- peft: PEFT's LoRA Linear (base + lora_B(lora_A(x)) * scaling, adapters in bf16);
- for q/k/v and the MLP also `lorafuse_parts`: the same block from separate lora_linear (and swiglu)
  calls, to show what grouping saves.
Gradients are taken with torch.autograd.grad (nothing accumulates into .grad between repeats).
FLOPs as DESIGN.md counts them: 4 per frozen weight per token (forward and dX, no frozen weight
gradient) and 6 per LoRA weight per token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafuse.kernels import lora_linear, swiglu
from lorafuse.kernels.lora_linear import lora_linear_group, lora_mlp

from benchutil import SMOKE, measure

RANK, ALPHA = 16, 32.0
SCALING = ALPHA / RANK
if SMOKE:  # CPU: the interpreter, tiny sizes, each case once
    PROJECTIONS, TOKENS = [(40, 24)], [16]
    HIDDEN, INTER, KV = 24, 40, 8
else:
    PROJECTIONS = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
    TOKENS = [8192, 16384]
    HIDDEN, INTER, KV = 4096, 14336, 1024  # Llama-3.1-8B: 32 q heads, 8 kv heads of 128


def _frozen(n_out, n_in, device, dtype):
    return (torch.randn(n_out, n_in, device=device) * n_in ** -0.5).to(dtype)


def _adapter(n_out, n_in, device, dtype):
    a = (torch.randn(RANK, n_in, device=device) * n_in ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(n_out, RANK, device=device) * 0.01).to(dtype).requires_grad_()
    return a, b


def _peft_linear(weight, a, b):
    """PEFT's LoRA Linear around a frozen nn.Linear holding `weight`, adapters set to (a, b)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    n_out, n_in = weight.shape
    base = torch.nn.Linear(n_in, n_out, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.data.copy_(weight)
    base.weight.requires_grad_(False)
    layer = Linear(base, "default", config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0), r=RANK,
                   lora_alpha=ALPHA)
    layer.to(device=weight.device, dtype=weight.dtype)
    layer.lora_A["default"].weight.data.copy_(a)
    layer.lora_B["default"].weight.data.copy_(b)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _fwd_bwd(forward, inputs):
    """A zero-argument callable: forward, then the gradients of all `inputs` for a fixed dY."""
    out = forward()
    dys = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

    def step():
        outs = forward()
        torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), inputs, dys)

    if not SMOKE:
        step()  # compile and autotune every kernel of the step before anything is timed
    return step


def _lora_flops(tokens, frozen_params, lora_params):
    return tokens * (4 * frozen_params + 6 * lora_params)


# ----------------------------------------------------------------------------- one projection


@pytest.mark.parametrize("system", ["lorafuse", "base", "peft"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("n_in,n_out", PROJECTIONS)
def test_lora_projection(benchmark, device, dtype, system, tokens, n_in, n_out):
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    weight = _frozen(n_out, n_in, device, dtype)
    a, b = _adapter(n_out, n_in, device, dtype)
    lora_params = RANK * (n_in + n_out)
    if system == "lorafuse":
        step = _fwd_bwd(lambda: lora_linear(x, weight, a, b, SCALING), [x, a, b])
    elif system == "base":
        step = _fwd_bwd(lambda: F.linear(x, weight), [x])
        lora_params = 0
    else:
        pytest.importorskip("peft")
        layer, params = _peft_linear(weight, a, b)
        step = _fwd_bwd(lambda: layer(x), [x, *params])
    measure(benchmark, step, flops=_lora_flops(tokens, n_in * n_out, lora_params), system=system,
            shape=f"{n_in}->{n_out}", tokens=tokens, rank=RANK, dtype=str(dtype), block="projection")


# ----------------------------------------------------------------------------- q/k/v (GQA)


@pytest.mark.parametrize("system", ["lorafuse", "lorafuse_parts", "base", "peft"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_qkv_group(benchmark, device, dtype, system, tokens):
    splits = [HIDDEN, KV, KV]
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    weight = _frozen(sum(splits), HIDDEN, device, dtype)  # [W_q; W_k; W_v], as the engine stacks them
    adapters = [_adapter(n, HIDDEN, device, dtype) for n in splits]
    lora_as, lora_bs = [a for a, _ in adapters], [b for _, b in adapters]
    params = [t for pair in adapters for t in pair]
    lora_params = RANK * sum(HIDDEN + n for n in splits)
    weights = weight.split(splits, 0)
    if system == "lorafuse":
        step = _fwd_bwd(lambda: lora_linear_group(x, weight, lora_as, lora_bs, [SCALING] * 3, splits),
                        [x, *params])
    elif system == "lorafuse_parts":
        def parts():
            pairs = zip(weights, adapters, strict=True)
            return tuple(lora_linear(x, w, a, b, SCALING) for w, (a, b) in pairs)

        step = _fwd_bwd(parts, [x, *params])
    elif system == "base":  # one fused frozen GEMM: the floor
        step = _fwd_bwd(lambda: F.linear(x, weight), [x])
        lora_params = 0
    else:
        pytest.importorskip("peft")
        layers = [_peft_linear(w, a, b) for w, (a, b) in zip(weights, adapters, strict=True)]
        peft_params = [p for _, ps in layers for p in ps]
        step = _fwd_bwd(lambda: tuple(layer(x) for layer, _ in layers), [x, *peft_params])
    measure(benchmark, step, flops=_lora_flops(tokens, HIDDEN * sum(splits), lora_params), system=system,
            shape=f"qkv {HIDDEN}->{'/'.join(map(str, splits))}", tokens=tokens, rank=RANK, dtype=str(dtype),
            block="qkv")


# ----------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("system", ["lorafuse", "lorafuse_parts", "base", "peft"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_mlp(benchmark, device, dtype, system, tokens):
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    gate_up = _frozen(2 * INTER, HIDDEN, device, dtype)
    down = _frozen(HIDDEN, INTER, device, dtype)
    (ga, gb), (ua, ub) = _adapter(INTER, HIDDEN, device, dtype), _adapter(INTER, HIDDEN, device, dtype)
    da, db = _adapter(HIDDEN, INTER, device, dtype)
    params = [ga, gb, ua, ub, da, db]
    lora_params = 3 * RANK * (HIDDEN + INTER)
    w_gate, w_up = gate_up.split(INTER, 0)
    if system == "lorafuse":
        step = _fwd_bwd(lambda: lora_mlp(x, gate_up, ga, gb, SCALING, ua, ub, SCALING, down, da, db, SCALING),
                        [x, *params])
    elif system == "lorafuse_parts":
        def parts():
            h = swiglu(lora_linear(x, w_gate, ga, gb, SCALING), lora_linear(x, w_up, ua, ub, SCALING))
            return lora_linear(h, down, da, db, SCALING)

        step = _fwd_bwd(parts, [x, *params])
    elif system == "base":
        def base():
            g, u = F.linear(x, gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(g) * u, down)

        step = _fwd_bwd(base, [x])
        lora_params = 0
    else:
        pytest.importorskip("peft")
        (gate, pg), (up, pu), (dn, pd) = (_peft_linear(w_gate, ga, gb), _peft_linear(w_up, ua, ub),
                                          _peft_linear(down, da, db))
        step = _fwd_bwd(lambda: dn(F.silu(gate(x)) * up(x)), [x, *pg, *pu, *pd])
    measure(benchmark, step, flops=_lora_flops(tokens, 3 * HIDDEN * INTER, lora_params), system=system,
            shape=f"mlp {HIDDEN}->{INTER}->{HIDDEN}", tokens=tokens, rank=RANK, dtype=str(dtype), block="mlp")

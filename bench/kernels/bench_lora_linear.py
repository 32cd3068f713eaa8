"""Fused LoRA linear, grouped q/k/v and the LoRA MLP: forward + backward, bf16, Llama-3.1-8B shapes.

Peers in the same run, per shape and token count:
- lorafuse: the Triton kernels (lora_linear, lora_linear_group, lora_mlp; LORAFUSE_LORA_GEMM=triton);
- base: the bare frozen layer, forward + dX only (no LoRA at all): the floor;
- peft: PEFT's LoRA Linear (base + lora_B(lora_A(x)) * scaling, adapters in bf16);
- for q/k/v and the MLP also `lorafuse_parts`: the same block from separate lora_linear (and swiglu)
  calls, to show what grouping saves.
test_lora_gemm_paths (below) times the Triton and the cuBLAS LoRA GEMM paths against the bare GEMMs and
test_record_choice writes what `auto` reads (issue 15; bench/README.md).
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


@pytest.fixture(autouse=True)
def _triton_gemms(monkeypatch):
    """`lorafuse` above means the Triton kernels; the two-path cases below pin each path themselves."""
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "triton")


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


# ----------------------------------------------------------------------------- the two LoRA GEMM paths (issue 15)
#
# Per Llama-3.1-8B GEMM, each path in the form the engine runs it, against the bare frozen GEMMs:
#   qkv: from the layer's hidden state: triton = rms_norm, then lora_linear_group (Triton GEMMs);
#        cublas = rms_norm_lowrank ([x_hat | U]), then the [x_hat | U] [W | B]^T GEMM; bare = rms_norm, F.linear
#   o:   lora_linear on an outside input: triton vs cublas (skinny U, GEMM, addmm; one dY [W | B] GEMM)
#   mlp: gate/up and down from the hidden state: triton = rms_norm, lora_mlp; cublas = rms_norm_lowrank,
#        [x_hat | U] [W | B]^T, glu_lowrank ([h | U_d]), [h | U_d] [W_d | B_d]^T; bare = rms_norm, F.linear x2, silu
# test_record_choice then writes the medians to $LORAFUSE_CACHE/lora_gemm.json under this GPU's name and each
# block's shape key (the mlp under gate/up's), which `LORAFUSE_LORA_GEMM=auto` and `train.lora_gemm: auto` read.

from lorafuse.kernels import rms_norm  # noqa: E402
from lorafuse.kernels._lora_gemm_select import forced_path, shape_key  # noqa: E402
from lorafuse.kernels.lora_cublas import AugmentedLinearFunction, block_b, register_augmented  # noqa: E402
from lorafuse.kernels.lora_linear import _Plan, _scale_vector  # noqa: E402
from lorafuse.kernels.rms_norm_lora import rms_norm_lowrank  # noqa: E402
from lorafuse.kernels.swiglu_lora import glu_lowrank  # noqa: E402

PATH_TOKENS = 16 if SMOKE else 16384
PATH_RESULTS: dict = {}


def _with_wb(weight, plan, lora_bs):
    """weight as the first K columns of a registered [W | B] buffer (engine/lora_gemm.py's layout)."""
    wb = torch.cat([weight, block_b(plan, lora_bs, weight.dtype)], 1)
    view = wb[:, :weight.shape[1]]
    register_augmented(view, wb)
    return view


def _path_case(block, system, device, dtype):
    """(step, inputs' flops, shape key) of one block on one path (see the comment above)."""
    T = PATH_TOKENS
    norm_w = torch.ones(HIDDEN, device=device, dtype=dtype)
    h = torch.randn(T, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    if block in ("qkv", "mlp"):
        splits = [HIDDEN, KV, KV] if block == "qkv" else [INTER, INTER]
        weight = _frozen(sum(splits), HIDDEN, device, dtype)
        adapters = [_adapter(n, HIDDEN, device, dtype) for n in splits]
        lora_as, lora_bs = [a.detach().float().requires_grad_() for a, _ in adapters], \
            [b.detach().float().requires_grad_() for _, b in adapters]
        plan = _Plan.make(tuple(splits), (RANK,) * len(splits), (SCALING,) * len(splits))
        scale = _scale_vector(plan.ranks, plan.scalings, device)
        params = [*lora_as, *lora_bs]
        key = shape_key(T, HIDDEN, sum(splits), RANK * len(splits))
        flops = _lora_flops(T, HIDDEN * sum(splits), RANK * sum(HIDDEN + n for n in splits))
        if block == "mlp":
            down = _frozen(HIDDEN, INTER, device, dtype)
            da, db = (t.detach().float().requires_grad_() for t in _adapter(HIDDEN, INTER, device, dtype))
            params += [da, db]
            flops += _lora_flops(T, HIDDEN * INTER, RANK * (HIDDEN + INTER))
        if system == "bare":
            def step_fn():
                x = rms_norm(h, norm_w, 1e-5)
                if block == "qkv":
                    return F.linear(x, weight)
                g, u = F.linear(x, weight).chunk(2, -1)
                return F.linear(F.silu(g) * u, down)
            return _fwd_bwd(step_fn, [h]), flops, key
        if system == "triton":
            def step_fn():
                with forced_path("triton"):
                    x = rms_norm(h, norm_w, 1e-5)
                    if block == "qkv":
                        return lora_linear_group(x, weight, lora_as, lora_bs, [SCALING] * 3, splits)
                    return lora_mlp(x, weight, lora_as[0], lora_bs[0], SCALING, lora_as[1], lora_bs[1], SCALING,
                                    down, da, db, SCALING)
            return _fwd_bwd(step_fn, [h, *params]), flops, key
        wview = _with_wb(weight, plan, lora_bs)
        if block == "mlp":
            dplan = _Plan.make((HIDDEN,), (RANK,), (SCALING,))
            dview = _with_wb(down, dplan, [db])
        a_stack = torch.cat(lora_as)

        def step_fn():
            x, u = rms_norm_lowrank(h, norm_w, 1e-5, 0.0, a_stack, scale)
            outs = AugmentedLinearFunction.apply(x, u, wview, None, plan, *lora_bs)
            if block == "qkv":
                return outs
            hh, ud = glu_lowrank(outs[0], outs[1], da, SCALING)
            return AugmentedLinearFunction.apply(hh, ud, dview, None, dplan, db)
        return _fwd_bwd(step_fn, [h, *params]), flops, key
    # o_proj: an input from outside (the attention output)
    weight = _frozen(HIDDEN, HIDDEN, device, dtype)
    a, b = (t.detach().float().requires_grad_() for t in _adapter(HIDDEN, HIDDEN, device, dtype))
    key = shape_key(T, HIDDEN, HIDDEN, RANK)
    flops = _lora_flops(T, HIDDEN * HIDDEN, RANK * 2 * HIDDEN)
    if system == "bare":
        return _fwd_bwd(lambda: F.linear(h, weight), [h]), flops, key
    if system == "cublas":
        weight = _with_wb(weight, _Plan.make((HIDDEN,), (RANK,), (SCALING,)), [b])

    def step_fn():
        with forced_path(system):
            return lora_linear(h, weight, a, b, SCALING)
    return _fwd_bwd(step_fn, [h, a, b]), flops, key


@pytest.mark.parametrize("system", ["triton", "cublas", "bare"])
@pytest.mark.parametrize("block", ["qkv", "o", "mlp"])
def test_lora_gemm_paths(benchmark, device, dtype, block, system):
    step, flops, key = _path_case(block, system, device, dtype)
    ms = measure(benchmark, step, flops=flops, system=f"lora_gemm_{system}", shape=key, tokens=PATH_TOKENS,
                 rank=RANK, dtype=str(dtype), block=f"lora_gemm {block}")
    PATH_RESULTS.setdefault((block, key), {})[system] = ms


def test_record_choice(device):
    """Write this GPU's measurements to the choice file (smoke mode: the same file shape, marked smoke, no times,
    which `auto` ignores)."""
    import json

    from lorafuse.kernels._lora_gemm_select import choice_file, read_choices

    if not PATH_RESULTS:
        pytest.skip("no test_lora_gemm_paths case ran in this session")
    gpu = torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)"
    choices = read_choices()
    mine = choices.setdefault(gpu, {})
    for (block, key), times in PATH_RESULTS.items():
        if SMOKE or any(times.get(s) is None for s in ("triton", "cublas", "bare")):
            mine[key] = {"block": block, "smoke": True}
            continue
        mine[key] = {"block": block, "triton_ms": times["triton"], "cublas_ms": times["cublas"],
                     "bare_ms": times["bare"], "choice": "cublas" if times["cublas"] <= times["triton"] else "triton",
                     "triton_x_bare": times["triton"] / times["bare"], "cublas_x_bare": times["cublas"] / times["bare"]}
    path = choice_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(choices, indent=1, sort_keys=True))
    print(f"[lora_gemm] wrote {path}: {json.dumps(mine, sort_keys=True)}")

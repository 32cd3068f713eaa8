"""The LoRA kernels read float32 masters in place under 16-bit activations (as the engine calls them) and return
float32 dA/dB; a group's block-diagonal B is read through the rank map, from adapters that are views of one
buffer (what inject_lora makes) or separate tensors. Forward and every gradient against float64, odd shapes."""

import importlib

import pytest
import torch

from kernel_utils import TOL, assert_close, expect_triton, rel_err

lora_module = importlib.import_module("lorafuse.kernels.lora_linear")
ADAPTER_KEYS = ("lora_a", "lora_b", "lora_as", "lora_bs", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def rand(*shape, scale=1.0):
    """float64 values exactly representable in float16, so every dtype sees the same inputs."""
    return (torch.randn(shape) * scale).half().double()


def leaf(t, dtype):
    return t.to(dtype).requires_grad_()


def stacked_leaves(tensors):
    """float32 leaves that are adjacent row blocks of one buffer, as inject_lora leaves a layer's adapters."""
    buffer = torch.cat(tensors).float()
    leaves, start = [], 0
    for t in tensors:
        p = torch.empty(0).requires_grad_()
        p.data = buffer[start:start + t.shape[0]]
        leaves.append(p)
        start += t.shape[0]
    return leaves


def run(fn, inputs, dys):
    outs = fn(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = {f"{k}[{i}]" if isinstance(v, list) else k: t for k, v in inputs.items()
              for i, t in enumerate(v if isinstance(v, list) else [v])
              if isinstance(t, torch.Tensor) and t.requires_grad}
    base = dys[0]._base
    if base is not None and all(dy._base is base for dy in dys):  # column blocks of one buffer stay so
        dys = base.to(outs[0].dtype).split([dy.shape[-1] for dy in dys], -1)
    grads = torch.autograd.grad(outs, list(leaves.values()), [dy.to(o.dtype) for o, dy in zip(outs, dys)])
    return outs, dict(zip(leaves, grads))


def check(op, inputs64, dtype, stacked=False, monkeypatch=None, one_dy=False):
    """The kernel with x and the frozen weights in dtype and float32 adapters, against float64; also no further
    from it than PyTorch with everything in dtype (adapters cast, as a 16-bit PEFT forward computes). one_dy: the
    outputs' gradients are column blocks of one buffer (as RoPE's backward hands q/k/v theirs)."""
    fn, ref = getattr(lora_module, op), getattr(lora_module, f"{op}_reference")

    def inputs_in(adapter_dtype, other_dtype, stack=False):
        out = {}
        for k, v in inputs64.items():
            dt = adapter_dtype if k in ADAPTER_KEYS else other_dtype
            if isinstance(v, list) and isinstance(v[0], torch.Tensor):
                out[k] = stacked_leaves(v) if stack else [leaf(t, dt) for t in v]
            else:
                out[k] = leaf(v, dt) if isinstance(v, torch.Tensor) else v
        return out

    with torch.no_grad():
        shapes = [o.shape for o in (lambda o: o if isinstance(o, tuple) else (o,))(ref(**inputs64))]
    dys = [rand(*s) for s in shapes]
    if one_dy:
        dys = list(torch.cat(dys, -1).split([s[-1] for s in shapes], -1))
    ref_outs, ref_grads = run(ref, inputs_in(torch.float64, torch.float64), dys)
    stock_outs, stock_grads = run(ref, inputs_in(dtype, dtype), dys)
    kernel_inputs = inputs_in(torch.float32, dtype, stack=stacked)
    if stacked:  # views of one buffer: read in place, no copy of the stack and no block-diagonal B
        for name in ("cat", "block_diag"):
            monkeypatch.setattr(torch, name, _forbidden(name))
    with expect_triton(op):
        outs, grads = run(fn, kernel_inputs, dys)
    if stacked:
        monkeypatch.undo()
    for name, o, r, s in [(f"out{i}", *t) for i, t in enumerate(zip(outs, ref_outs, stock_outs))] + \
            [(f"d{k}", grads[k], ref_grads[k], stock_grads[k]) for k in ref_grads]:
        is_adapter = name[1:].split("[")[0] in ADAPTER_KEYS
        assert o.dtype == (torch.float32 if is_adapter else dtype), name  # float32 dA/dB, like the masters
        assert_close(o, r, dtype, name)
        err, stock_err = rel_err(o, r), rel_err(s, r)
        assert err <= 2 * stock_err + TOL[dtype] / 10, f"{name}: {err:.2e}, PyTorch {stock_err:.2e} ({dtype})"


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"torch.{name} ran: the stacked adapters were copied")
    return fail


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_single_projection_reads_float32_masters(dtype):
    check("lora_linear", dict(x=rand(37, 45), weight=rand(53, 45, scale=45 ** -0.5), lora_a=rand(8, 45, scale=0.15),
                              lora_b=rand(53, 8, scale=0.35), scaling=2.0, bias=rand(53)), dtype)


def group(T, K, splits, r):
    return dict(x=rand(T, K), weight=rand(sum(splits), K, scale=K ** -0.5),
                lora_as=[rand(r, K, scale=K ** -0.5) for _ in splits],
                lora_bs=[rand(n, r, scale=r ** -0.5) for n in splits],
                scalings=[2.0, 0.5, 1.5][:len(splits)], out_splits=list(splits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("stacked", [False, True])
def test_qkv_group_rank_map(dtype, stacked, monkeypatch):
    """q/k/v of odd widths, equal ranks: B through the rank map; the adapters one buffer or three tensors."""
    check("lora_linear_group", group(37, 45, (40, 13, 13), 4), dtype, stacked=stacked, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_group_db_from_one_gradient_buffer_is_one_gemm(dtype, monkeypatch):
    """The dY_i column blocks of one buffer: the dB_i come out of one GEMM (the rank map on its output), stacked by
    rows, each block contiguous (the masters' layout); only dA stays a GEMM of its own."""
    grad_mms = []
    original = lora_module._grad_mm
    monkeypatch.setattr(lora_module, "_grad_mm", lambda a, b: grad_mms.append(a.shape) or original(a, b))
    check("lora_linear_group", group(37, 45, (40, 13, 13), 4), dtype, stacked=True, monkeypatch=monkeypatch,
          one_dy=True)
    assert grad_mms == [(12, 37)], grad_mms  # dA of the stack; no dB_i GEMM one by one


def test_group_of_two_one_token(monkeypatch):
    check("lora_linear_group", group(1, 33, (17, 17), 3), torch.float16, stacked=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mlp_reads_float32_masters(dtype):
    H, inter, r = 37, 29, 4
    inputs = dict(x=rand(19, H), gate_up_weight=rand(2 * inter, H, scale=H ** -0.5),
                  gate_a=rand(r, H, scale=H ** -0.5), gate_b=rand(inter, r, scale=0.5), gate_scaling=2.0,
                  up_a=rand(r, H, scale=H ** -0.5), up_b=rand(inter, r, scale=0.5), up_scaling=0.5,
                  down_weight=rand(H, inter, scale=inter ** -0.5), down_a=rand(r, inter, scale=inter ** -0.5),
                  down_b=rand(H, r, scale=0.5), down_scaling=1.5)
    check("lora_mlp", inputs, dtype)


def test_adapter_rows_are_a_view_only_when_adjacent():
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    buffer = torch.cat([a, b])
    view = lora_module._rows([buffer[:3], buffer[3:]])
    assert view.data_ptr() == buffer.data_ptr() and torch.equal(view, buffer)
    copied = lora_module._rows([buffer[3:], buffer[:3]])  # same buffer, wrong order: a copy
    assert copied.data_ptr() != buffer.data_ptr() and torch.equal(copied, torch.cat([b, a]))

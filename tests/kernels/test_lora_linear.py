"""lora_linear, lora_linear_group and lora_mlp through the Triton interpreter (float32, float16) and on
GPU (bfloat16), forward and every gradient against a float64 reference."""

import importlib

import pytest
import torch

from lorafuse.kernels._launch import launches

from kernel_utils import TOL, assert_close, expect_triton, poison_outputs, rel_err

lora_module = importlib.import_module("lorafuse.kernels.lora_linear")
lora_linear = lora_module.lora_linear
lora_linear_group = lora_module.lora_linear_group
lora_mlp = lora_module.lora_mlp
lora_linear_reference = lora_module.lora_linear_reference
lora_linear_group_reference = lora_module.lora_linear_group_reference
lora_mlp_reference = lora_module.lora_mlp_reference

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _triton_gemms(monkeypatch):
    """These tests check the Triton GEMMs; on a GPU `auto` may pick the cuBLAS path (test_lora_cublas.py's)."""
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "triton")


# ----------------------------------------------------------------------------- helpers


def rand(*shape, dtype, scale=1.0, grad=False, device="cpu"):
    """float64 values exactly representable in dtype, so every run sees the same inputs."""
    t = (torch.randn(shape, device=device) * scale).to(dtype).double()
    return t.requires_grad_(grad)


def _cast(v, dtype):
    if isinstance(v, torch.Tensor):
        return v.detach().to(dtype).requires_grad_(v.requires_grad)
    if isinstance(v, (list, tuple)):
        return type(v)(_cast(t, dtype) for t in v)
    if isinstance(v, dict):
        return {k: _cast(t, dtype) for k, t in v.items()}
    return v


def _leaves(inputs):
    leaves = {}
    for name, v in inputs.items():
        for i, t in enumerate(v) if isinstance(v, (list, tuple)) else [(None, v)]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                leaves[name if i is None else f"{name}[{i}]"] = t
    return leaves


def _run(fn, inputs, dys):
    outs = fn(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = _leaves(inputs)
    used = [(o, dy) for o, dy in zip(outs, dys, strict=True) if dy is not None]
    grads = torch.autograd.grad([o for o, _ in used], list(leaves.values()),
                                [dy.to(o.dtype) for o, dy in used])
    return outs, dict(zip(leaves, grads, strict=True))


def check(op, fn, ref_fn, inputs64, dtype, unused_outputs=()):
    """Run fn in dtype (proving its Triton kernel ran) and compare outputs and gradients with ref_fn
    in float64; in low precision also with ref_fn run in dtype (stock PyTorch) plus a margin."""
    with torch.no_grad():
        shapes = [o.shape for o in (lambda o: o if isinstance(o, tuple) else (o,))(ref_fn(**inputs64))]
    device = next(iter(_leaves(inputs64).values())).device
    dys = [None if i in unused_outputs else rand(*shape, dtype=dtype, device=device)
           for i, shape in enumerate(shapes)]
    ref_outs, ref_grads = _run(ref_fn, inputs64, dys)
    stock_outs, stock_grads = _run(ref_fn, _cast(inputs64, dtype), dys)
    with expect_triton(op):
        outs, grads = _run(fn, _cast(inputs64, dtype), dys)
    pairs = [(f"out{i}", o, r, s) for i, (o, r, s) in enumerate(zip(outs, ref_outs, stock_outs, strict=True))]
    pairs += [(f"d{name}", grads[name], ref_grads[name], stock_grads[name]) for name in ref_grads]
    for name, o, r, s in pairs:
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close(o, r, dtype, name)
        err, stock_err = rel_err(o, r), rel_err(s, r)
        assert err <= 2 * stock_err + TOL[dtype] / 10, f"{name}: {err:.2e}, PyTorch {stock_err:.2e} ({dtype})"
    return outs


def check_single(inputs, dtype):
    return check("lora_linear", lora_linear, lora_linear_reference, inputs, dtype)


def single_inputs(T, K, N, r, dtype, *, bias=False, x_grad=True, weight_grad=False, device="cpu", lead=()):
    return dict(
        x=rand(*lead, T, K, dtype=dtype, grad=x_grad, device=device),
        weight=rand(N, K, dtype=dtype, scale=K ** -0.5, grad=weight_grad, device=device),
        lora_a=rand(r, K, dtype=dtype, scale=K ** -0.5, grad=True, device=device),
        lora_b=rand(N, r, dtype=dtype, scale=r ** -0.5, grad=True, device=device),
        scaling=2.0,
        bias=rand(N, dtype=dtype, grad=weight_grad, device=device) if bias else None,
    )


def group_inputs(T, K, splits, ranks, dtype, *, bias=False, weight_grad=False, device="cpu", lead=()):
    return dict(
        x=rand(*lead, T, K, dtype=dtype, grad=True, device=device),
        weight=rand(sum(splits), K, dtype=dtype, scale=K ** -0.5, grad=weight_grad, device=device),
        lora_as=[rand(r, K, dtype=dtype, scale=K ** -0.5, grad=True, device=device) if r else None
                 for r in ranks],
        lora_bs=[rand(n, r, dtype=dtype, scale=r ** -0.5, grad=True, device=device) if r else None
                 for n, r in zip(splits, ranks, strict=True)],
        scalings=[2.0, 0.5, 1.5, 1.0][:len(splits)],
        out_splits=list(splits),
        bias=rand(sum(splits), dtype=dtype, grad=weight_grad, device=device) if bias else None,
    )


def mlp_inputs(T, H, I, ranks, dtype, *, weight_grad=False, device="cpu", lead=()):
    def adapter(r, n_out, n_in):
        if not r:
            return None, None
        return (rand(r, n_in, dtype=dtype, scale=n_in ** -0.5, grad=True, device=device),
                rand(n_out, r, dtype=dtype, scale=r ** -0.5, grad=True, device=device))

    (ga, gb), (ua, ub), (da, db) = adapter(ranks[0], I, H), adapter(ranks[1], I, H), adapter(ranks[2], H, I)
    return dict(x=rand(*lead, T, H, dtype=dtype, grad=True, device=device),
                gate_up_weight=rand(2 * I, H, dtype=dtype, scale=H ** -0.5, grad=weight_grad, device=device),
                gate_a=ga, gate_b=gb, gate_scaling=2.0, up_a=ua, up_b=ub, up_scaling=0.5,
                down_weight=rand(H, I, dtype=dtype, scale=I ** -0.5, grad=weight_grad, device=device),
                down_a=da, down_b=db, down_scaling=1.5)


# ----------------------------------------------------------------------------- lora_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_float64(dtype, r, bias):
    check_single(single_inputs(37, 45, 53, r, dtype, bias=bias), dtype)


def test_lora_linear_whole_tiles():
    """Sizes that are multiples of every interpreter block: the unmasked (EVEN_K) main loop."""
    check("lora_linear", lora_linear, lora_linear_reference, single_inputs(64, 64, 96, 16, torch.float16),
          torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_weight_and_bias_grads(dtype):
    inputs = single_inputs(70, 33, 41, 8, dtype, bias=True, weight_grad=True)
    check("lora_linear", lora_linear, lora_linear_reference, inputs, dtype)


def test_lora_linear_3d_strided_input():
    """x a non-contiguous 3-D view (a column slice of a bigger activation)."""
    inputs = single_inputs(9, 60, 29, 16, torch.float32, bias=True, lead=(2,))

    def sliced(fn):
        return lambda x, **kw: fn(x[..., 5:50], **kw)

    inputs["weight"] = inputs["weight"][:, :45].contiguous()
    inputs["lora_a"] = inputs["lora_a"][:, :45].detach().contiguous().requires_grad_()
    out = check("lora_linear", sliced(lora_linear), sliced(lora_linear_reference), inputs, torch.float32)[0]
    assert out.shape == (2, 9, 29)


def test_lora_linear_input_without_grad():
    """The first layer's input needs no gradient: only dA and dB (no dX GEMM)."""
    check_single(single_inputs(21, 30, 19, 8, torch.float32, x_grad=False), torch.float32)


@pytest.mark.parametrize("T,K,N,r", [(1, 1, 1, 1), (1, 33, 17, 16), (5, 40, 1, 1)])
def test_lora_linear_sizes_of_one(T, K, N, r):
    check_single(single_inputs(T, K, N, r, torch.float32, bias=True), torch.float32)


def test_every_buffer_is_written(monkeypatch):
    """Poisoned (NaN) buffers for every kernel output: an element left unwritten shows up."""
    poison_outputs(monkeypatch)
    f32 = torch.float32
    check_single(single_inputs(37, 45, 53, 8, f32, bias=True), f32)
    check("lora_linear_group", lora_linear_group, lora_linear_group_reference,
          group_inputs(33, 40, (24, 8, 8), (4, 0, 2), f32), f32, unused_outputs=(1,))
    check("lora_mlp", lora_mlp, lora_mlp_reference, mlp_inputs(19, 37, 29, (8, 0, 4), f32), f32)


def test_reference_when_asked(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    before = launches["lora_linear"]
    inputs = single_inputs(5, 7, 3, 2, torch.float32)
    torch.testing.assert_close(lora_linear(**inputs), lora_linear_reference(**inputs))
    assert launches["lora_linear"] == before


# ----------------------------------------------------------------------------- lora_linear_group


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_gqa_qkv(dtype):
    """q/k/v under GQA (4 query heads, 1 kv head of 16), different ranks and scalings, one input."""
    T = 33
    inputs = group_inputs(T, 40, (64, 16, 16), (16, 8, 1), dtype, bias=True)
    q, k, v = check("lora_linear_group", lora_linear_group, lora_linear_group_reference, inputs, dtype)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert q.view(T, 4, 16).shape == (T, 4, 16) and k.view(T, 1, 16).shape == (T, 1, 16)


def test_group_weight_grads_missing_adapter_unused_output():
    """3-D input, a projection without adapter, an output outside the loss, weight and bias trained."""
    inputs = group_inputs(7, 40, (24, 8, 8), (4, 0, 2), torch.float32, bias=True, weight_grad=True, lead=(3,))
    outs = check("lora_linear_group", lora_linear_group, lora_linear_group_reference, inputs, torch.float32,
                 unused_outputs=(1,))
    assert [o.shape for o in outs] == [(3, 7, 24), (3, 7, 8), (3, 7, 8)]


def test_group_more_projections_than_segments():
    """Four projections (more dY pieces than one launch takes): the concatenated path."""
    inputs = group_inputs(17, 23, (8, 5, 8, 3), (2, 0, 3, 1), torch.float32, bias=True)
    check("lora_linear_group", lora_linear_group, lora_linear_group_reference, inputs, torch.float32)


def test_group_without_adapters():
    inputs = group_inputs(17, 23, (8, 5), (0, 0), torch.float16, bias=True, weight_grad=True)
    check("lora_linear_group", lora_linear_group, lora_linear_group_reference, inputs, torch.float16)


def test_group_rejects_mismatched_adapter():
    inputs = _cast(group_inputs(5, 8, (4, 4), (2, 2), torch.float32), torch.float32)
    inputs["lora_bs"][1] = None
    with pytest.raises(ValueError):
        lora_linear_group(**inputs)


# ----------------------------------------------------------------------------- lora_mlp


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_matches_float64(dtype):
    check("lora_mlp", lora_mlp, lora_mlp_reference, mlp_inputs(19, 37, 29, (8, 4, 16), dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_with_residual_matches_float64(dtype):
    """residual + down(...): the decoder's residual add in the down GEMM's epilogue, and its gradient."""
    inputs = mlp_inputs(19, 37, 29, (8, 4, 16), dtype)
    inputs["residual"] = rand(19, 37, dtype=dtype, scale=3.0, grad=True)
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, dtype)


def test_mlp_residual_must_match_x():
    inputs = _cast(mlp_inputs(5, 16, 24, (4, 4, 4), torch.float32), torch.float32)
    with pytest.raises(ValueError, match="residual"):
        lora_mlp(**inputs, residual=torch.zeros(5, 16, dtype=torch.float16))


def test_mlp_partial_adapters_and_weight_grads():
    """Only the gate adapted (up and down plain), the frozen weights trained too, 3-D input."""
    inputs = mlp_inputs(6, 37, 29, (8, 0, 0), torch.float32, weight_grad=True, lead=(2,))
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, torch.float32)


def test_mlp_down_adapter_only():
    inputs = mlp_inputs(11, 20, 40, (0, 0, 1), torch.float16)
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_geglu_matches_float64(dtype):
    """Gemma's MLP: gelu_tanh(gate) * up, the GeGLU backward in the dH GEMM's epilogue."""
    inputs = {**mlp_inputs(19, 37, 29, (8, 4, 16), dtype), "activation": "gelu_tanh"}
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, dtype)


def test_mlp_geglu_partial_adapters_weight_grads_every_buffer_written(monkeypatch):
    poison_outputs(monkeypatch)
    inputs = {**mlp_inputs(6, 37, 29, (0, 8, 1), torch.float32, weight_grad=True, lead=(2,)),
              "activation": "gelu_tanh"}
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, torch.float32)


def test_mlp_activation_is_checked_and_reaches_the_reference(monkeypatch):
    inputs = _cast(mlp_inputs(5, 8, 6, (2, 2, 2), torch.float32), torch.float32)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(**inputs, activation="gelu")
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    gelu = lora_mlp(**inputs, activation="gelu_tanh")
    assert not torch.allclose(gelu, lora_mlp(**inputs))
    torch.testing.assert_close(gelu, lora_mlp_reference(**inputs, activation="gelu_tanh"))


# ----------------------------------------------------------------------------- GPU, bfloat16

LLAMA_8B_PROJECTIONS = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", LLAMA_8B_PROJECTIONS)
def test_lora_linear_bf16_on_gpu(K, N):
    inputs = single_inputs(4096, K, N, 16, torch.bfloat16, device="cuda")
    check("lora_linear", lora_linear, lora_linear_reference, inputs, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 64])
def test_lora_linear_bf16_ranks_bias_weight_grad_on_gpu(r):
    inputs = single_inputs(1000, 4096, 1000, r, torch.bfloat16, bias=True, weight_grad=True, device="cuda")
    check("lora_linear", lora_linear, lora_linear_reference, inputs, torch.bfloat16)


@pytest.mark.gpu
def test_group_qkv_bf16_on_gpu():
    inputs = group_inputs(4096, 4096, (4096, 1024, 1024), (16, 16, 16), torch.bfloat16, device="cuda")
    check("lora_linear_group", lora_linear_group, lora_linear_group_reference, inputs, torch.bfloat16)


@pytest.mark.gpu
def test_mlp_bf16_on_gpu():
    inputs = mlp_inputs(2048, 4096, 14336, (16, 16, 16), torch.bfloat16, device="cuda")
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, torch.bfloat16)


@pytest.mark.gpu
def test_mlp_with_residual_bf16_on_gpu():
    inputs = mlp_inputs(2048, 4096, 14336, (16, 16, 16), torch.bfloat16, device="cuda")
    inputs["residual"] = rand(2048, 4096, dtype=torch.bfloat16, scale=3.0, grad=True, device="cuda")
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, torch.bfloat16)


@pytest.mark.gpu
def test_mlp_geglu_bf16_on_gpu():
    """Gemma-2-2B's MLP (hidden 2304, intermediate 9216) with gelu_tanh."""
    inputs = {**mlp_inputs(2048, 2304, 9216, (16, 16, 16), torch.bfloat16, device="cuda"),
              "activation": "gelu_tanh"}
    check("lora_mlp", lora_mlp, lora_mlp_reference, inputs, torch.bfloat16)

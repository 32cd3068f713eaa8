"""swiglu and geglu through the Triton interpreter (float32, float16) and on GPU (bfloat16) against float64."""

import importlib

import pytest
import torch

from lorafuse.kernels import geglu, swiglu

from kernel_utils import TOL, assert_close, expect_triton, poison_outputs, poisoned, rel_err

swiglu_module = importlib.import_module("lorafuse.kernels.swiglu")
swiglu_reference = swiglu_module.swiglu_reference
geglu_reference = swiglu_module.geglu_reference
OPS = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}


def _grads(gate, up, dh, fn):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    h = fn(gate, up)
    dg, du = torch.autograd.grad(h, (gate, up), dh.to(h.dtype))
    return h, dg, du


def _check_against_float64(gate, up, dh, dtype, op="swiglu"):
    run, reference = OPS[op]
    with expect_triton(op):
        ours = _grads(gate.to(dtype), up.to(dtype), dh, run)
    ref = _grads(gate.double(), up.double(), dh.double(), reference)
    stock = _grads(gate.to(dtype), up.to(dtype), dh, reference)
    for name, o, r, s in zip(("h", "dgate", "dup"), ours, ref, stock, strict=True):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close(o, r, dtype, name)
        # no further from float64 than PyTorch in the same dtype, plus a margin
        assert rel_err(o, r) <= 2 * rel_err(s, r) + TOL[dtype] / 10, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (2, 3, 1029)])
def test_swiglu_matches_float64(dtype, shape):
    gate, up, dh = (torch.randn(shape) * 3 for _ in range(3))
    _check_against_float64(gate, up, dh, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_on_column_slices_of_one_buffer(dtype):
    """gate/up as the two halves of a fused [rows, 2 I] projection output: strided rows, no copy."""
    gu = torch.randn(19, 2 * 45) * 3
    dh = torch.randn(19, 45)

    buf = gu.to(dtype).requires_grad_()
    with expect_triton("swiglu"):
        h = swiglu(buf[:, :45], buf[:, 45:])
    (dbuf,) = torch.autograd.grad(h, buf, dh.to(dtype))
    ref_buf = gu.double().requires_grad_()
    h_ref = swiglu_reference(ref_buf[:, :45], ref_buf[:, 45:])
    (dref,) = torch.autograd.grad(h_ref, ref_buf, dh.double())
    assert_close(h, h_ref, dtype, "h")
    assert_close(dbuf, dref, dtype, "dgu")


def test_swiglu_writes_every_element(monkeypatch):
    poison_outputs(monkeypatch)
    gate, up, dh = (torch.randn(23, 1100) for _ in range(3))
    _check_against_float64(gate, up, dh, torch.float32)
    out = poisoned((23, 1100), torch.float32)
    swiglu_module.swiglu_forward_triton(gate, up, out=out)
    assert_close(out, swiglu_reference(gate.double(), up.double()), torch.float32, "h into a given buffer")


def test_reference_when_asked(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    from lorafuse.kernels._launch import launches

    before = launches["swiglu"]
    gate, up = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))
    assert launches["swiglu"] == before


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 14336), (3, 1029)])
def test_swiglu_bf16_on_gpu(shape):
    gate, up, dh = (torch.randn(shape, device="cuda") * 3 for _ in range(3))
    _check_against_float64(gate, up, dh, torch.bfloat16)


# ----------------------------------------------------------------------------- geglu (Gemma's gelu_pytorch_tanh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (2, 3, 1029)])
def test_geglu_matches_float64(dtype, shape):
    gate, up, dh = (torch.randn(shape) * 3 for _ in range(3))
    _check_against_float64(gate, up, dh, dtype, op="geglu")


def test_geglu_is_pytorch_gelu_tanh_at_extremes():
    """Saturated tanh (|g| up to 40, where g^3 is large), zeros and tiny values, against F.gelu's own
    float64 autograd: forward and both gradients."""
    gate = torch.tensor([[-40.0, -9.0, -3.0, -1e-3, -1e-6, 0.0, 1e-6, 1e-3, 0.5, 3.0, 9.0, 40.0]])
    up, dh = torch.randn_like(gate), torch.randn_like(gate)
    _check_against_float64(gate, up, dh, torch.float32, op="geglu")
    g64 = gate.double().requires_grad_()
    u64 = up.double().requires_grad_()
    h64 = torch.nn.functional.gelu(g64, approximate="tanh") * u64
    ref = (h64, *torch.autograd.grad(h64, (g64, u64), dh.double()))
    ours = _grads(gate, up, dh, geglu)
    for name, o, r in zip(("h", "dgate", "dup"), ours, ref, strict=True):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6, msg=name)


def test_geglu_on_column_slices_of_one_buffer_writes_every_element(monkeypatch):
    poison_outputs(monkeypatch)
    gu = torch.randn(19, 2 * 45) * 3
    dh = torch.randn(19, 45)
    buf = gu.to(torch.float16).requires_grad_()
    with expect_triton("geglu"):
        h = geglu(buf[:, :45], buf[:, 45:])
    (dbuf,) = torch.autograd.grad(h, buf, dh.to(torch.float16))
    ref_buf = gu.double().requires_grad_()
    h_ref = geglu_reference(ref_buf[:, :45], ref_buf[:, 45:])
    (dref,) = torch.autograd.grad(h_ref, ref_buf, dh.double())
    assert_close(h, h_ref, torch.float16, "h")
    assert_close(dbuf, dref, torch.float16, "dgu")


def test_geglu_reference_when_asked_and_shape_check(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    from lorafuse.kernels._launch import launches

    before = launches["geglu"]
    gate, up = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(geglu(gate, up), torch.nn.functional.gelu(gate, approximate="tanh") * up)
    assert launches["geglu"] == before
    with pytest.raises(ValueError):
        geglu(gate, up[:, :6])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 16384), (3, 1029)])
def test_geglu_bf16_on_gpu(shape):
    gate, up, dh = (torch.randn(shape, device="cuda") * 3 for _ in range(3))
    _check_against_float64(gate, up, dh, torch.bfloat16, op="geglu")

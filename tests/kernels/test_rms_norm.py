"""RMSNorm (offset 0: Llama/Qwen; offset 1: Gemma's (1 + w)) and its fused residual form.

On CPU the Triton kernels run through the interpreter (float32, float16) against a float64
reference: outputs, dx, dresidual, and dw when the weight requires grad. Every buffer the kernels
write starts as NaN. The GPU test checks bfloat16 at the widths of real models.
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels import rms_norm
from lorafuse.kernels._launch import launches
from lorafuse.kernels.rms_norm import (
    rms_norm_branch,
    rms_norm_branch_reference,
    rms_norm_reference,
    rms_norm_residual,
    rms_norm_residual_reference,
)

from kernel_utils import TOL, assert_close, expect_triton, poison_outputs, rel_err

EPS = 1e-6


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element a kernel forgets to write shows."""
    poison_outputs(monkeypatch)


def rms_norm64(x, weight, eps, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


def make_input(shape, layout, dtype, device="cpu"):
    """x of `shape`, laid out as the engine's callers produce it."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    if layout == "qkv_view":  # Qwen3 q-norm: q split out of a fused qkv output, token stride > H * D
        tokens, heads, head_dim = shape
        fused = torch.randn(tokens, (heads + 3) * head_dim + 7, dtype=dtype, device=device)
        return fused[:, head_dim:(heads + 1) * head_dim].view(tokens, heads, head_dim)
    if layout == "row_stride":  # rows of a wider buffer
        return torch.randn(*shape[:-1], shape[-1] + 9, dtype=dtype, device=device)[..., 3:3 + shape[-1]]
    if layout == "transposed":  # leading dims that do not collapse into one stride
        return torch.randn(shape[1], shape[0], *shape[2:], dtype=dtype, device=device).transpose(0, 1)
    raise ValueError(layout)


def leaf(t, requires_grad=True):
    return t.detach().requires_grad_(requires_grad)


def check(name, out, ref64, stock, dtype):
    """Within the dtype's tolerance of float64, and (low precision) no further than stock PyTorch."""
    assert out.dtype == stock.dtype, f"{name}: dtype {out.dtype}, expected {stock.dtype}"
    assert_close(out, ref64, dtype, name)
    if dtype != torch.float32:
        ours, theirs = rel_err(out, ref64), rel_err(stock, ref64)
        assert ours <= 1.1 * theirs + 1e-5, f"{name}: {ours:.3e} vs stock {dtype} {theirs:.3e}"


CASES = [
    ((7, 1000), "contiguous"),      # odd width, rows not a multiple of the row tile
    ((3, 5, 33), "contiguous"),     # 3-D, tiny odd width
    ((1, 2048), "row_stride"),      # T = 1 at a model width, strided rows
    ((5, 300), "row_stride"),       # rows of a wider buffer
    ((9, 5, 128), "qkv_view"),      # Qwen3 per-head q/k norm on a fused-qkv view
    ((2, 3, 4, 64), "transposed"),  # 4-D that needs a copy to become rows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("offset,weight_grad", [(0.0, False), (1.0, True), (0.0, True), (1.0, False)],
                         ids=["off0", "off1-dw", "off0-dw", "off1"])
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES])
def test_rms_norm_matches_float64(shape, layout, offset, weight_grad, dtype):
    x = make_input(shape, layout, dtype).requires_grad_()
    weight = ((0.1 if offset else 1.0) * torch.randn(shape[-1]) + (0.0 if offset else 1.0)).to(dtype)
    weight.requires_grad_(weight_grad)
    with expect_triton("rms_norm"):
        y = rms_norm(x, weight, EPS, offset)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64 = leaf(x.double()), leaf(weight.double(), weight_grad)
    y64 = rms_norm64(x64, w64, EPS, offset)
    y64.backward(dy.double())
    xs, ws = leaf(x), leaf(weight, weight_grad)
    ys = rms_norm_reference(xs, ws, EPS, offset)
    ys.backward(dy)

    check("y", y, y64, ys, dtype)
    check("dx", x.grad, x64.grad, xs.grad, dtype)
    if weight_grad:
        check("dw", weight.grad, w64.grad, ws.grad, dtype)
    else:
        assert weight.grad is None


RESIDUAL_CASES = [
    ((7, 1000), "contiguous"),
    ((1, 33), "contiguous"),       # T = 1
    ((2, 5, 96), "row_stride"),    # 3-D, strided rows for x and residual
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("offset,weight_grad", [(0.0, False), (1.0, True)], ids=["off0", "off1-dw"])
@pytest.mark.parametrize("shape,layout", RESIDUAL_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in RESIDUAL_CASES])
def test_rms_norm_residual_matches_float64(shape, layout, offset, weight_grad, dtype):
    x = make_input(shape, layout, dtype).requires_grad_()
    residual = make_input(shape, layout, dtype).mul_(3.0).requires_grad_()
    weight = (torch.randn(shape[-1]) * 0.5 + (0.0 if offset else 1.0)).to(dtype).requires_grad_(weight_grad)
    with expect_triton("rms_norm_residual"):
        y, h = rms_norm_residual(x, residual, weight, EPS, offset)
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == dtype
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward((y, h), (dy, dh))

    x64, r64, w64 = leaf(x.double()), leaf(residual.double()), leaf(weight.double(), weight_grad)
    h64 = x64 + r64
    y64 = rms_norm64(h64, w64, EPS, offset)
    torch.autograd.backward((y64, h64), (dy.double(), dh.double()))
    xs, rs, ws = leaf(x), leaf(residual), leaf(weight, weight_grad)
    ys, hs = rms_norm_residual_reference(xs, rs, ws, EPS, offset)
    torch.autograd.backward((ys, hs), (dy, dh))

    check("y", y, y64, ys, dtype)
    check("h", h, h64, hs, dtype)
    check("dx", x.grad, x64.grad, xs.grad, dtype)
    check("dresidual", residual.grad, r64.grad, rs.grad, dtype)
    if weight_grad:
        check("dw", weight.grad, w64.grad, ws.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("offset,weight_grad", [(0.0, False), (1.0, True)], ids=["off0", "off1-dw"])
def test_rms_norm_branch_adds_the_residual_gradient_in_its_kernel(offset, weight_grad, dtype):
    """(y, x): x read by a second path (the residual stream) gets both gradients from one backward launch."""
    x = make_input((37, 96), "contiguous", dtype).requires_grad_()
    weight = (torch.randn(96) * 0.5 + (0.0 if offset else 1.0)).to(dtype).requires_grad_(weight_grad)
    before = launches["rms_norm"]
    y, x_again = rms_norm_branch(x, weight, EPS, offset)
    assert launches["rms_norm"] == before + 1 and torch.equal(x_again, x)
    assert x_again.data_ptr() == x.data_ptr()  # the same storage, no copy
    dy, dbranch = torch.randn_like(y), torch.randn_like(x)
    torch.autograd.backward((y, x_again * 1), (dy, dbranch))  # `* 1`: x_again is read by another op

    x64, w64 = leaf(x.double()), leaf(weight.double(), weight_grad)
    torch.autograd.backward((rms_norm64(x64, w64, EPS, offset), x64 * 1), (dy.double(), dbranch.double()))
    xs, ws = leaf(x), leaf(weight, weight_grad)
    ys, xs_again = rms_norm_branch_reference(xs, ws, EPS, offset)
    torch.autograd.backward((ys, xs_again * 1), (dy, dbranch))
    check("y", y, rms_norm64(x.double(), weight.double(), EPS, offset), ys, dtype)
    check("dx", x.grad, x64.grad, xs.grad, dtype)
    if weight_grad:
        check("dw", weight.grad, w64.grad, ws.grad, dtype)


def test_residual_norm_is_of_the_rounded_sum():
    """h is rounded to x's dtype before it is normalised, as `rms_norm(x + residual)` would be."""
    x, residual = torch.randn(5, 100, dtype=torch.float16), torch.randn(5, 100, dtype=torch.float16)
    weight = torch.randn(100, dtype=torch.float16)
    y, h = rms_norm_residual(x, residual, weight, EPS)
    assert torch.equal(h, x + residual)
    assert torch.equal(y, rms_norm(x + residual, weight, EPS))


def test_weight_grad_only():
    """x not requiring grad (a frozen embedding below): only dw is computed."""
    x = torch.randn(6, 40)
    weight = torch.randn(40, requires_grad=True)
    dy = torch.randn(6, 40)
    with expect_triton("rms_norm"):
        rms_norm(x, weight, EPS, 1.0).backward(dy)
    x64, w64 = x.double(), leaf(weight.double())
    rms_norm64(x64, w64, EPS, 1.0).backward(dy.double())
    assert_close(weight.grad, w64.grad, torch.float32, "dw")


def test_float32_weight_with_float16_input():
    x = torch.randn(4, 3, 50, dtype=torch.float16, requires_grad=True)
    weight = torch.randn(50, requires_grad=True)
    y = rms_norm(x, weight, EPS)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and weight.grad.dtype == torch.float32
    x64, w64 = leaf(x.double()), leaf(weight.double())
    rms_norm64(x64, w64, EPS, 0.0).sum().backward()
    assert_close(y, rms_norm64(x64, w64, EPS, 0.0), torch.float16, "y")
    assert_close(x.grad, x64.grad, torch.float16, "dx")
    assert_close(weight.grad, w64.grad, torch.float16, "dw")


def test_no_grad_and_empty():
    with torch.no_grad():
        x = torch.randn(3, 70)
        weight = torch.randn(70)
        ref = rms_norm64(x.double(), weight.double(), EPS, 0.0)
        assert_close(rms_norm(x, weight, EPS), ref, torch.float32)
        assert rms_norm(torch.randn(0, 70), weight, EPS).shape == (0, 70)


def test_reference_mode_runs_no_kernel(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    x, weight = torch.randn(3, 17), torch.randn(17)
    before = (launches["rms_norm"], launches["rms_norm_residual"])
    assert torch.equal(rms_norm(x, weight, EPS, 1.0), rms_norm_reference(x, weight, EPS, 1.0))
    rms_norm_residual(x, x, weight, EPS)
    assert (launches["rms_norm"], launches["rms_norm_residual"]) == before


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        rms_norm(torch.randn(3, 16), torch.randn(15), EPS)
    with pytest.raises(ValueError):
        rms_norm_residual(torch.randn(3, 16), torch.randn(2, 16), torch.randn(16), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("offset,weight_grad", [(0.0, False), (1.0, True)], ids=["off0", "off1-dw"])
@pytest.mark.parametrize("rows,width,layout", [
    (4096, 2048, "contiguous"), (4096, 3584, "contiguous"), (16384, 4096, "contiguous"),
    (4096, 5120, "row_stride"), (16384, 8192, "contiguous"), (3001, 1000, "contiguous"),
    ((4096, 32, 128), None, "qkv_view"), ((4096, 8, 128), None, "qkv_view"),
], ids=["2048", "3584", "4096", "5120-strided", "8192", "1000", "qnorm-32x128", "knorm-8x128"])
def test_rms_norm_bf16_gpu(rows, width, layout, offset, weight_grad):
    dtype = torch.bfloat16
    shape = rows if isinstance(rows, tuple) else (rows, width)
    x = make_input(shape, layout, dtype, "cuda").requires_grad_()
    weight = (0.1 * torch.randn(shape[-1], device="cuda") + (0.0 if offset else 1.0)).to(dtype)
    weight.requires_grad_(weight_grad)
    with expect_triton("rms_norm"):
        y = rms_norm(x, weight, EPS, offset)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = leaf(x.double()), leaf(weight.double(), weight_grad)
    rms_norm64(x64, w64, EPS, offset).backward(dy.double())
    xs, ws = leaf(x), leaf(weight, weight_grad)
    ys = rms_norm_reference(xs, ws, EPS, offset)
    ys.backward(dy)
    check("y", y, rms_norm64(x64.detach(), w64.detach(), EPS, offset), ys, dtype)
    check("dx", x.grad, x64.grad, xs.grad, dtype)
    if weight_grad:
        check("dw", weight.grad, w64.grad, ws.grad, dtype)

    # The fused residual form at the same size.
    residual = make_input(shape, layout, dtype, "cuda").requires_grad_()
    x.grad = None
    with expect_triton("rms_norm_residual"):
        y, h = rms_norm_residual(x, residual, weight, EPS, offset)
    dh = torch.randn_like(h)
    torch.autograd.backward((y, h), (dy, dh))
    x64, r64 = leaf(x.double()), leaf(residual.double())
    h64 = x64 + r64
    y64 = rms_norm64(h64, w64.detach(), EPS, offset)
    torch.autograd.backward((y64, h64), (dy.double(), dh.double()))
    assert_close(y, y64, dtype, "residual y", tol=TOL[dtype])
    assert_close(h, h64, dtype, "residual h")
    assert_close(x.grad, x64.grad, dtype, "residual dx")
    assert_close(residual.grad, r64.grad, dtype, "residual dresidual")

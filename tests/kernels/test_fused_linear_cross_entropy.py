"""Fused linear cross-entropy: loss = CE(hidden @ weight.T + bias, labels) without [N, V] logits.

On CPU the Triton kernels run through the interpreter (float32, float16) against a float64 reference
built from full logits and F.cross_entropy: the loss, the returned z-loss, and the gradients of hidden,
weight and bias. Both Triton paths are checked (the default "chunked" one: cuBLAS GEMMs + one Triton
softmax kernel per chunk; the opt-in "fused" CCE-style one), plus the PyTorch reference path. Every
buffer the kernels fill starts as NaN. The GPU test checks bfloat16 at Llama-3's vocabulary.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from lorafuse.kernels import fused_linear_cross_entropy

from kernel_utils import TOL, assert_close, expect_triton, poison_outputs, rel_err

flce_module = importlib.import_module("lorafuse.kernels.fused_linear_cross_entropy")
OP = "fused_linear_cross_entropy"
IGNORE = -100


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer a kernel or GEMM is meant to fill starts as NaN, so an element left unwritten shows."""
    poison_outputs(monkeypatch)


@pytest.fixture(params=["chunked", "fused"])
def path(request, monkeypatch):
    monkeypatch.setattr(flce_module, "PATH_POLICY", request.param)
    return request.param


def make_case(n, h, v, dtype, *, ignored=(), bias=False, weight_grad=True, device="cpu"):
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * h**-0.5 * 3).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), device=device)
    labels[list(ignored)] = IGNORE
    b = (torch.randn(v, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, b


def grads_of(loss, hidden, weight, bias):
    wrt = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wrt))
    return [next(got) if t is not None and t.requires_grad else None for t in (hidden, weight, bias)]


def loss64(hidden, weight, labels, bias, *, reduction="mean", softcap=None, label_smoothing=0.0,
           z_loss_weight=0.0, low_precision=False):
    """Full-logits PyTorch loss: in float64 (the reference) or, low_precision, as stock code in the input
    dtype would compute it (logits in that dtype, upcast to float32 for the softmax, as HF does)."""
    if low_precision:
        z = F.linear(hidden, weight, bias).float()
    else:
        z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    c = z if softcap is None else softcap * torch.tanh(z / softcap)
    keep = labels != IGNORE
    loss = F.cross_entropy(c, labels, ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing)
    lse = torch.logsumexp(c, -1)
    z_loss = z_loss_weight * torch.where(keep, lse * lse, 0).sum()
    loss = loss + z_loss
    if reduction == "mean":  # F.cross_entropy's own mean is NaN with no targets
        n = keep.sum().clamp(min=1)
        loss, z_loss = loss / n, z_loss / n
    return loss, z_loss


def check(name, out, ref, stock, dtype, tol=None):
    """Within the dtype's tolerance of float64 and, in low precision, no worse than stock PyTorch."""
    if out is None and ref is None:
        return
    assert out is not None and ref is not None, f"{name}: gradient presence differs"
    assert_close(out, ref, dtype, name, tol)
    if dtype != torch.float32:
        ours, theirs = rel_err(out, ref), rel_err(stock, ref)
        assert ours <= 1.5 * theirs + 1e-4, f"{name}: {ours:.3e} vs stock {dtype} {theirs:.3e}"


def run_and_check(hidden, weight, labels, bias, dtype, *, reduction="mean", grad_scale=1.0, **opts):
    """Run the op (Triton proven), compare loss, z-loss and every gradient with float64 and stock."""
    with expect_triton(OP):
        loss, z_loss = fused_linear_cross_entropy(hidden, weight, labels, IGNORE, reduction, bias,
                                                  return_z_loss=True, **opts)
    assert loss.dtype == torch.float32 and loss.shape == () and z_loss.shape == ()
    assert not z_loss.requires_grad
    got = grads_of(loss * grad_scale, hidden, weight, bias)
    ref_loss, ref_z = loss64(hidden, weight, labels, bias, reduction=reduction, **opts)
    ref = grads_of(ref_loss * grad_scale, hidden, weight, bias)
    stock_loss, stock = ref_loss, ref
    if dtype != torch.float32:
        stock_loss, _ = loss64(hidden, weight, labels, bias, reduction=reduction, low_precision=True, **opts)
        stock = grads_of(stock_loss * grad_scale, hidden, weight, bias)
    check("loss", loss, ref_loss, stock_loss, dtype)
    if opts.get("z_loss_weight"):
        check("z_loss", z_loss, ref_z, ref_z, torch.float32, TOL[dtype])
    else:
        assert z_loss.item() == 0.0
    for name, g, r, s, t in zip(("grad_hidden", "grad_weight", "grad_bias"), got, ref, stock,
                                (hidden, weight, bias), strict=True):
        if g is not None:
            assert g.dtype == t.dtype and g.shape == t.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        check(name, g, r, s, dtype)
    return loss, got


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


@DTYPES
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float64(path, dtype, reduction):
    # odd sizes: rows not a multiple of any row tile, vocab larger than the interpreter's vocab block
    hidden, weight, labels, bias = make_case(23, 67, 1003, dtype, ignored=(0, 5, 6, 22), bias=True)
    run_and_check(hidden, weight, labels, bias, dtype, reduction=reduction, grad_scale=2.5)


@DTYPES
def test_softcap_smoothing_z_loss(path, dtype):
    hidden, weight, labels, _ = make_case(19, 33, 517, dtype, ignored=(3,))
    run_and_check(hidden, weight, labels, None, dtype, softcap=4.0, label_smoothing=0.1, z_loss_weight=1e-3)


@pytest.mark.parametrize("opt", [{"softcap": 2.5}, {"label_smoothing": 0.2}, {"z_loss_weight": 0.01}],
                         ids=["softcap", "smoothing", "z_loss"])
def test_each_option_alone(opt):
    hidden, weight, labels, bias = make_case(11, 40, 300, torch.float32, ignored=(2,), bias=True)
    run_and_check(hidden, weight, labels, bias, torch.float32, reduction="sum", **opt)


def test_chunks_with_every_label_ignored(path, monkeypatch):
    """Rows 0..15 ignored: whole chunks (8 rows) of the chunked path and a whole row block (16) of the
    fused one see no target."""
    n, v = 37, 203
    monkeypatch.setattr(flce_module, "LOGITS_CHUNK_BYTES", 8 * v * 4)
    hidden, weight, labels, _ = make_case(n, 24, v, torch.float32, ignored=range(16))
    labels[30] = IGNORE
    _, (grad_h, _, _) = run_and_check(hidden, weight, labels, None, torch.float32, softcap=3.0)
    assert torch.count_nonzero(grad_h[:16]) == 0 and torch.count_nonzero(grad_h[30]) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored_gives_zero_not_nan(path, reduction):
    hidden, weight, labels, bias = make_case(9, 20, 130, torch.float32, ignored=range(9), bias=True)
    with expect_triton(OP):
        loss, z_loss = fused_linear_cross_entropy(hidden, weight, labels, IGNORE, reduction, bias,
                                                  z_loss_weight=0.1, label_smoothing=0.1, return_z_loss=True)
    grads = grads_of(loss, hidden, weight, bias)
    assert loss.item() == 0.0 and z_loss.item() == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_single_row_and_hidden_size_one(path):
    hidden, weight, labels, _ = make_case(1, 1, 77, torch.float32)
    run_and_check(hidden, weight, labels, None, torch.float32)


def test_vocab_beyond_gpu_vocab_block():
    """V = 4099 > the GPU autotune list's 4096 block: several tiles and a 3-element tail."""
    hidden, weight, labels, _ = make_case(3, 16, 4099, torch.float32, weight_grad=False)
    labels[1] = 4098
    run_and_check(hidden, weight, labels, None, torch.float32, softcap=30.0)


def test_frozen_head_and_strided_hidden(path):
    """LoRA's case: weight without grad (no grad_weight work); hidden a transposed, non-contiguous view."""
    hidden = torch.randn(29, 13).t().requires_grad_()  # [13, 29], strides (1, 13)
    weight = (torch.randn(250, 29) * 0.3).requires_grad_(False)
    labels = torch.randint(0, 250, (13,))
    labels[4] = IGNORE
    _, (grad_h, grad_w, _) = run_and_check(hidden, weight, labels, None, torch.float32, reduction="sum")
    assert grad_w is None and grad_h.shape == (13, 29)


def test_int32_labels_and_custom_ignore_index():
    hidden, weight, labels, _ = make_case(10, 12, 90, torch.float32)
    labels[[1, 7]] = 0
    with expect_triton(OP):
        loss = fused_linear_cross_entropy(hidden, weight, labels.int(), ignore_index=0)
    ref = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels, ignore_index=0)
    assert_close(loss, ref, torch.float32, "loss")


def test_out_of_range_label_poisons_loss(path):
    hidden, weight, labels, _ = make_case(4, 8, 50, torch.float32, weight_grad=False)
    labels[2] = 50
    with expect_triton(OP):
        loss = fused_linear_cross_entropy(hidden.detach(), weight, labels)
    assert torch.isnan(loss)


def test_loss_only_without_grad(path):
    """No input requires grad (evaluation): the chunked kernel skips its gradient pass."""
    hidden, weight, labels, _ = make_case(7, 16, 260, torch.float16, ignored=(1,))
    with torch.no_grad(), expect_triton(OP):
        loss = fused_linear_cross_entropy(hidden, weight, labels, softcap=5.0)
    ref, _ = loss64(hidden, weight, labels, None, softcap=5.0)
    assert_close(loss, ref, torch.float16, "loss")


def test_backward_twice_is_refused():
    hidden, weight, labels, _ = make_case(3, 8, 40, torch.float32, weight_grad=False)
    with expect_triton(OP):
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_path_policy_callable(monkeypatch):
    seen = []

    def policy(n_rows, vocab, hidden_size, dtype, weight_needs_grad):
        seen.append((n_rows, vocab, hidden_size, dtype, weight_needs_grad))
        return "fused"

    monkeypatch.setattr(flce_module, "PATH_POLICY", policy)
    hidden, weight, labels, _ = make_case(5, 16, 64, torch.float32, weight_grad=False)
    run_and_check(hidden, weight, labels, None, torch.float32)
    assert seen == [(5, 64, 16, torch.float32, False)]
    monkeypatch.setattr(flce_module, "PATH_POLICY", "other")
    with pytest.raises(ValueError, match="PATH_POLICY"):
        fused_linear_cross_entropy(hidden, weight, labels)


def test_rejects_bad_arguments():
    hidden, weight, labels, _ = make_case(4, 8, 30, torch.float32)
    for kwargs, match in (({"reduction": "none"}, "reduction"), ({"softcap": 0.0}, "softcap"),
                          ({"label_smoothing": 1.5}, "label_smoothing"), ({"z_loss_weight": -1.0}, "z_loss")):
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_cross_entropy(hidden, weight.half(), labels)
    with pytest.raises(TypeError, match="LORAFUSE_KERNELS=reference"):
        fused_linear_cross_entropy(hidden.double(), weight.double(), labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reference_path_matches_float64(monkeypatch, dtype):
    """The PyTorch reference (LORAFUSE_KERNELS=reference) with every option, chunked into 3 chunks."""
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    monkeypatch.setattr(flce_module, "CHUNK_BYTES", 8 * 301 * 4)
    hidden, weight, labels, bias = make_case(21, 17, 301, dtype, ignored=(*range(8), 9), bias=True)
    opts = dict(softcap=3.0, label_smoothing=0.05, z_loss_weight=1e-2)
    loss, z_loss = fused_linear_cross_entropy(hidden, weight, labels, IGNORE, "mean", bias,
                                              return_z_loss=True, **opts)
    ref_loss, ref_z = loss64(hidden, weight, labels, bias, **opts)
    tol = 1e-10 if dtype == torch.float64 else None
    assert_close(loss, ref_loss, dtype, "loss", tol)
    assert_close(z_loss, ref_z, dtype, "z_loss", tol)
    for name, g, r in zip(("hidden", "weight", "bias"), grads_of(loss * 1.5, hidden, weight, bias),
                          grads_of(ref_loss * 1.5, hidden, weight, bias), strict=True):
        assert_close(g, r, dtype, name, tol)


def test_rows_kernel_writes_every_output():
    """The row kernel alone into NaN-poisoned loss/lse: every row written, ignored rows' gradients 0."""
    rows, vocab = 6, 700
    logits = torch.randn(rows, vocab)
    labels = torch.tensor([3, IGNORE, 699, 0, IGNORE, 350])
    loss_rows = torch.full((rows,), float("nan"))
    lse_rows = torch.full((rows,), float("nan"))
    grad = logits.clone()
    flce_module._rows_kernel(rows, grad, labels, loss_rows, loss_rows, lse_rows, torch.ones(()), vocab, vocab,
                             IGNORE, 0.0, 0.0, 0.0, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_SMOOTHING=False,
                             COMPUTE_GRAD=True)
    keep = labels != IGNORE
    lse = torch.logsumexp(logits.double(), -1)
    ref_grad = torch.softmax(logits.double(), -1)
    ref_grad[keep.nonzero()[:, 0], labels[keep]] -= 1
    ref_grad[~keep] = 0
    ref_loss = torch.where(keep, lse - logits.double().gather(1, labels.clamp(min=0)[:, None])[:, 0], 0)
    assert_close(loss_rows, ref_loss, torch.float32, "loss rows")
    assert_close(lse_rows, torch.where(keep, lse, 0), torch.float32, "lse rows")
    assert_close(grad, ref_grad, torch.float32, "grad")
    assert torch.count_nonzero(grad[~keep]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("path_name", ["chunked", "fused"])
def test_gpu_bf16_llama3_vocab(monkeypatch, path_name):
    """bfloat16 at Llama-3's vocabulary and width (fewer rows, several chunks) against float64 on the GPU."""
    monkeypatch.setattr(flce_module, "PATH_POLICY", path_name)
    monkeypatch.setattr(flce_module, "LOGITS_CHUNK_BYTES", 64 * 2**20)  # 261 rows a chunk: 4 chunks
    n, h, v = 1031, 4096, 128256
    dtype = torch.bfloat16
    hidden, weight, labels, _ = make_case(n, h, v, dtype, ignored=range(0, n, 7), device="cuda")
    labels[250:600] = IGNORE  # covers the whole second chunk (rows 258..515): no targets
    for opts in ({}, {"softcap": 30.0, "label_smoothing": 0.1, "z_loss_weight": 1e-4}):
        run_and_check(hidden, weight, labels, None, dtype, **opts)
    frozen = weight.detach()
    run_and_check(hidden, frozen, labels, None, dtype, reduction="sum")

"""varlen_attention: Triton kernels (interpreter on CPU, GPU where lent) against a float64 per-document
reference, forward and dq, dk, dv; causal and not, sliding windows and softcapping."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from lorafuse.kernels import varlen_attention

from kernel_utils import TOL, assert_close, expect_triton, poison_outputs, rel_err

# the module (the package attribute of that name is the op)
va = importlib.import_module("lorafuse.kernels.varlen_attention")
reference = va.varlen_attention_reference


def _cu(lengths, device="cpu"):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device)


def _inputs(lengths, hq, hkv, d, device="cpu", strided=False):
    """float64 q [T, Hq, D], k, v [T, Hkv, D]; strided: views of one fused [T, (Hq + 2 Hkv) D] tensor,
    as the engine splits a fused qkv projection (token stride > H * D)."""
    n_tokens = sum(lengths)
    if strided:
        fused = torch.randn(n_tokens, (hq + 2 * hkv) * d, dtype=torch.float64, device=device)
        q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=1)
        return q.unflatten(1, (hq, d)), k.unflatten(1, (hkv, d)), v.unflatten(1, (hkv, d))
    return tuple(torch.randn(n_tokens, h, d, dtype=torch.float64, device=device) for h in (hq, hkv, hkv))


def _run(fn, q, k, v, dout, cu, max_seqlen, causal, dtype, **kw):
    """Output and (dq, dk, dv) of fn on q, k, v cast to dtype, keeping their strides."""
    leaves = [torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=x.device).copy_(x).requires_grad_()
              for x in (q, k, v)]
    out = fn(*leaves, cu, max_seqlen, causal, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return (out, *grads)


NAMES = ("out", "dq", "dk", "dv")


def _check(lengths, hq, hkv, d, dtype, causal=True, strided=False, dout_strided=False, **kw):
    """Forward and every gradient in dtype against float64; kw (window, softcap) goes to both sides."""
    q, k, v = _inputs(lengths, hq, hkv, d, strided=strided)
    assert not strided or not q.is_contiguous()
    cu = _cu(lengths)
    max_seqlen = max(lengths)
    if dout_strided:  # a gradient whose token and head strides are not those of a contiguous [T, Hq, D]
        dout = torch.randn(sum(lengths), hq, d + 8, dtype=torch.float64)[..., :d]
    else:
        dout = torch.randn(sum(lengths), hq, d, dtype=torch.float64)
    ref = _run(reference, q, k, v, dout, cu, max_seqlen, causal, torch.float64, **kw)
    with expect_triton("varlen_attention"):
        ours = _run(varlen_attention, q, k, v, dout, cu, max_seqlen, causal, dtype, **kw)
    assert ours[0].shape == (sum(lengths), hq, d) and ours[0].dtype == dtype
    for name, o, r in zip(NAMES, ours, ref, strict=True):
        assert_close(o, r, dtype, name)
    if dtype != torch.float32:
        # no further from float64 than stock PyTorch (per-document SDPA) in the same dtype, plus a margin
        stock = _run(reference, q, k, v, dout, cu, max_seqlen, causal, dtype, **kw)
        for name, o, s, r in zip(NAMES, ours, stock, ref, strict=True):
            err, stock_err = rel_err(o, r), rel_err(s, r)
            assert err <= 1.5 * stock_err + 2e-4, f"{name}: {err:.2e} vs stock {dtype} {stock_err:.2e}"
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_document(dtype):
    _check([77], 2, 2, 64, dtype)


def test_many_documents_with_length_one_and_empty():
    # lengths 1 and an empty document; T = 127 is not a multiple of any block
    _check([1, 5, 1, 33, 0, 17, 1, 64, 2, 1, 2], 4, 1, 64, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa_group_7_head_dim_80(dtype):
    _check([1, 40, 29], 7, 1, 80, dtype)


@pytest.mark.parametrize("hq,hkv,dtype", [(4, 1, torch.float16), (2, 2, torch.float32)])
def test_gqa_groups_4_and_1(hq, hkv, dtype):
    _check([3, 50, 1, 20], hq, hkv, 64, dtype)


@pytest.mark.parametrize("hq,hkv,d,dtype", [(2, 2, 64, torch.float32), (4, 1, 80, torch.float16)])
def test_non_causal(hq, hkv, d, dtype):
    _check([1, 45, 30], hq, hkv, d, dtype, causal=False)


def test_head_dim_128():
    _check([1, 37], 2, 1, 128, torch.float32)


@pytest.mark.parametrize("d", [96, 256])
def test_head_dims_96_and_256(d):
    _check([1, 70], 2, 1, d, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_long_document_over_several_tiles(causal):
    # 150 rows: five query tiles and three key tiles in the interpreter's config
    _check([150, 3], 4, 2, 64, torch.float16, causal=causal)


def test_no_tokens():
    q = torch.randn(0, 2, 64, requires_grad=True)
    kv = torch.randn(0, 1, 64, requires_grad=True)
    with expect_triton("varlen_attention"):
        out = varlen_attention(q, kv, kv, torch.zeros(2, dtype=torch.int32), 0)
    assert out.shape == (0, 2, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape and kv.grad.shape == kv.shape


@pytest.mark.parametrize("causal", [True, False])
def test_strided_views_of_fused_qkv(causal):
    _check([9, 1, 41], 4, 2, 64, torch.float32, causal=causal, strided=True, dout_strided=True)


def test_many_tiny_documents():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = torch.randint(1, 4, (40,), generator=gen).tolist()
    _check(lengths, 2, 1, 64, torch.float32)


def test_softmax_scale():
    q, k, v = _inputs([6, 25], 2, 1, 64)
    cu = _cu([6, 25])
    ref = reference(q, k, v, cu, 25, True, 0.3)
    with expect_triton("varlen_attention"):
        out = varlen_attention(q.float(), k.float(), v.float(), cu, 25, softmax_scale=0.3)
    assert_close(out, ref, torch.float32)


def test_deterministic_is_bitwise_reproducible():
    q, k, v = _inputs([2, 37, 1, 26], 4, 1, 80)
    cu = _cu([2, 37, 1, 26])
    dout = torch.randn(q.shape, dtype=torch.float64)
    first = _run(varlen_attention, q, k, v, dout, cu, 37, True, torch.float16, deterministic=True)
    second = _run(varlen_attention, q, k, v, dout, cu, 37, True, torch.float16, deterministic=True)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


def test_poisoned_buffers_are_fully_written(monkeypatch):
    """Every float buffer the op allocates (out, lse, delta, dq, dk, dv) starts as NaN: an element a
    kernel forgets to write shows up as a NaN in the outputs or gradients."""
    lengths = [1, 35, 2, 1, 20]
    q, k, v = _inputs(lengths, 4, 2, 80)
    cu = _cu(lengths)
    dout = torch.randn(q.shape, dtype=torch.float64)
    ref = _run(reference, q, k, v, dout, cu, 35, True, torch.float64)
    poison_outputs(monkeypatch)
    with expect_triton("varlen_attention"):
        ours = _run(varlen_attention, q, k, v, dout, cu, 35, True, torch.float32)
    monkeypatch.undo()
    for name, o, r in zip(NAMES, ours, ref, strict=True):
        assert torch.isfinite(o).all(), f"{name}: unwritten (NaN) elements"
        assert_close(o, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_again_computes_k_and_v_in_backward_instead_of_keeping_them(dtype):
    """With kv_again the backward gets k and v from fn(*inputs), run once, and autograd keeps neither k nor v:
    gradients equal those of the kept k and v bitwise (the same values), and fn's k and v may be strided."""
    lengths = [5, 33, 1, 17]
    q64, k64, v64 = _inputs(lengths, 4, 2, 80)
    cu, dout = _cu(lengths), torch.randn(q64.shape, dtype=torch.float64).to(dtype)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    kept = _run(varlen_attention, q64, k64, v64, dout, cu, 33, True, dtype)

    source = torch.cat([k.detach(), v.detach()], 1) * 2  # what fn computes from: k and v are views of it
    calls = []

    def again(src):
        calls.append(src)
        return src[:, :2] / 2, src[:, 2:] / 2

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with expect_triton("varlen_attention"):
            out = varlen_attention(q, k, v, cu, 33, kv_again=va.KVAgain(again, (source,)))
    saved = {t.untyped_storage().data_ptr() for t in packed}
    assert k.untyped_storage().data_ptr() not in saved and v.untyped_storage().data_ptr() not in saved
    assert source.untyped_storage().data_ptr() in saved
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(calls) == 1 and calls[0] is source
    for name, a, b in zip(NAMES, (out, *grads), kept, strict=True):
        assert torch.equal(a, b), f"{name} differs from the run that kept k and v"


def test_kv_again_that_gives_other_shapes_is_an_error():
    q, k, v = (t.float().requires_grad_() for t in _inputs([9], 2, 1, 16))
    cu = _cu([9])
    out = varlen_attention(q, k, v, cu, 9, kv_again=va.KVAgain(lambda: (k[:, :, :8], v), ()))
    with pytest.raises(RuntimeError, match="kv_again gave k"):
        out.sum().backward()
    with pytest.raises(TypeError, match="KVAgain"):
        varlen_attention(q, k, v, cu, 9, kv_again=va.KVAgain(None, ()))


def test_tile_schedule_maps_programs_to_documents():
    lengths = [1, 0, 70, 32, 33, 5]
    tile = 32
    tile_doc, tile_end, bound = va._tile_schedule(_cu(lengths), sum(lengths), tile)
    assert bound == math.ceil(sum(lengths) / tile) + len(lengths)
    expected = [doc for doc, n in enumerate(lengths) for _ in range(math.ceil(n / tile))]
    assert tile_doc.dtype == torch.int32 and tile_end.dtype == torch.int32
    assert tile_doc[:len(expected)].tolist() == expected
    assert (tile_doc[len(expected):] == len(lengths)).all()  # programs past the real tiles exit
    assert tile_end.tolist() == torch.tensor([math.ceil(n / tile) for n in lengths]).cumsum(0).tolist()


def test_reference_mode_matches(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    q, k, v = _inputs([3, 9], 2, 1, 64)
    out = varlen_attention(q, k, v, _cu([3, 9]), 9)
    assert_close(out, reference(q, k, v, _cu([3, 9]), 9), torch.float64)


def test_argument_checks():
    q = torch.randn(5, 4, 64)
    kv = torch.randn(5, 2, 64)
    cu = _cu([2, 3])
    with pytest.raises(ValueError):
        varlen_attention(q, torch.randn(5, 3, 64), torch.randn(5, 3, 64), cu, 3)
    with pytest.raises(ValueError):
        varlen_attention(q, kv, kv, cu.long(), 3)
    with pytest.raises(TypeError):
        varlen_attention(q, kv, kv, cu, torch.tensor(3))
    with pytest.raises(ValueError):
        varlen_attention(q, kv.half(), kv.half(), cu, 3)


# ---------------------------------------------------------------------------------------------
# Sliding windows (Mistral, Gemma 2/3) and softcapping (Gemma 2). The interpreter runs query tiles of 32,
# key tiles (dK/dV) of 64 and blocks of 16 (va.INTERP_TILES, va.INTERP_BLOCK).
# ---------------------------------------------------------------------------------------------

WINDOW_DOCS = [1, 150, 40, 3]  # T = 194: one document over several tiles, one of a tile and a bit, tiny ones


@pytest.mark.parametrize("window,dtype", [
    (1, torch.float32),  # the diagonal alone: out = v, dq = dk = 0 (their error is then absolute)
    (5, torch.float16),  # inside one block
    (16, torch.float32),  # exactly one block
    (45, torch.float16),  # straddles query tiles and key tiles
    (100, torch.float32),  # longer than every document but the 150-token one
])
def test_sliding_window(window, dtype):
    _check(WINDOW_DOCS, 4, 2, 32, dtype, window=window)


def test_window_longer_than_every_document_is_plain_causal():
    lengths = [1, 30, 7, 1]
    q, k, v = _inputs(lengths, 2, 1, 32)
    cu = _cu(lengths)
    dout = torch.randn(q.shape, dtype=torch.float64)
    causal = _run(reference, q, k, v, dout, cu, 30, True, torch.float64)
    with expect_triton("varlen_attention"):  # 31 < T: the windowed kernels run
        ours = _run(varlen_attention, q, k, v, dout, cu, 30, True, torch.float32, window=31)
    for name, o, c in zip(NAMES, ours, causal, strict=True):
        assert_close(o, c, torch.float32, name)
    # a window of T or more is no window at all: the plain causal kernels, bit for bit
    windowless = _run(varlen_attention, q, k, v, dout, cu, 30, True, torch.float32)
    for name, a, b in zip(NAMES, _run(varlen_attention, q, k, v, dout, cu, 30, True, torch.float32, window=39),
                          windowless, strict=True):
        assert torch.equal(a, b), name


def test_window_gqa_group_7_head_dim_80():
    _check([1, 40, 29], 7, 1, 80, torch.float16, window=9)


def test_window_many_tiny_documents():
    _check([1, 2, 3, 1, 2, 5, 1, 1, 4, 2, 3, 1], 2, 1, 32, torch.float32, window=2)


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (True, torch.float16), (False, torch.float32)])
def test_softcap(causal, dtype):
    # scores scale * q.k ~ N(0, 1): a cap of 0.7 bends most of them
    _check([1, 70, 20], 4, 2, 64, dtype, causal=causal, softcap=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_with_window(dtype):
    _check(WINDOW_DOCS, 4, 1, 32, dtype, window=20, softcap=1.5)


def test_head_dim_256_window_softcap():
    """Gemma's head dim."""
    _check([1, 50], 2, 1, 256, torch.float32, window=20, softcap=5.0)


def test_window_softcap_poisoned_buffers_strided_views(monkeypatch):
    lengths = [1, 35, 2, 1, 20]
    poison_outputs(monkeypatch)
    _check(lengths, 4, 2, 48, torch.float32, strided=True, dout_strided=True, window=7, softcap=2.0)


def test_tiles_outside_the_window_are_never_read():
    """NaN keys/values or NaN gradients of queries far outside a tile's window stay out of its results,
    which only holds when the loops skip those blocks: a masked block still multiplies its values (0 * NaN)."""
    n, window, hq, hkv, d = 160, 20, 2, 1, 32
    tile_q, tile_kv = va.INTERP_TILES
    block = va.INTERP_BLOCK
    q, k, v = _inputs([n], hq, hkv, d)
    cu = _cu([n])
    dout = torch.randn(n, hq, d, dtype=torch.float64)
    clean = _run(reference, q, k, v, dout, cu, n, True, torch.float64, window=window)

    # forward and dQ: values of the first key block poisoned; query tiles whose window starts past that block
    bad_v = v.clone()
    bad_v[:block] = float("nan")
    with expect_triton("varlen_attention"):
        out, dq, _, _ = _run(varlen_attention, q, k, bad_v, dout, cu, n, True, torch.float32, window=window)
    first_clean = min(s for s in range(0, n, tile_q) if max(s - window + 1, 0) // block >= 1)
    assert 0 < first_clean < n - tile_q
    assert_close(out[first_clean:], clean[0][first_clean:], torch.float32, "out past the poisoned keys")
    assert_close(dq[first_clean:], clean[1][first_clean:], torch.float32, "dq past the poisoned keys")
    assert torch.isnan(out[:block]).all()  # those that see them do read them

    # dK/dV: gradients of the last query block poisoned; key tiles whose window ends before it
    bad_dout = dout.clone()
    bad_dout[n - block:] = float("nan")
    _, _, dk, dv = _run(varlen_attention, q, k, v, bad_dout, cu, n, True, torch.float32, window=window)
    last_clean = max(s + tile_kv for s in range(0, n, tile_kv) if s + tile_kv - 1 + window <= n - block)
    assert 0 < last_clean < n - block
    assert_close(dk[:last_clean], clean[2][:last_clean], torch.float32, "dk before the poisoned queries")
    assert_close(dv[:last_clean], clean[3][:last_clean], torch.float32, "dv before the poisoned queries")
    assert torch.isnan(dv[n - 1]).all()


def test_reference_window_and_softcap_semantics():
    """The reference itself: window 1 returns v; a window of at least the document is causal; a huge cap is
    no cap; the cap follows softcap * tanh(scale q.k / softcap) (checked against a per-query loop)."""
    lengths = [1, 9, 4]
    q, k, v = _inputs(lengths, 4, 2, 16)
    cu = _cu(lengths)
    torch.testing.assert_close(reference(q, k, v, cu, 9, window=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(reference(q, k, v, cu, 9, window=9), reference(q, k, v, cu, 9))
    torch.testing.assert_close(reference(q, k, v, cu, 9, softcap=1e9), reference(q, k, v, cu, 9))
    out = reference(q, k, v, cu, 9, softmax_scale=0.3, window=3, softcap=0.5)
    for i in range(1, 10):  # the 9-token document, rows 1..9 of the batch
        keys = range(max(1, i - 2), i + 1)
        for h in range(4):
            s = torch.stack([0.3 * q[i, h] @ k[j, h // 2] for j in keys])
            p = torch.softmax(0.5 * torch.tanh(s / 0.5), 0)
            expected = sum(pj * v[j, h // 2] for pj, j in zip(p, keys, strict=True))
            torch.testing.assert_close(out[i, h], expected)


def test_window_and_softcap_in_reference_mode(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    q, k, v = _inputs([3, 9], 2, 1, 64)
    cu = _cu([3, 9])
    out = varlen_attention(q, k, v, cu, 9, window=4, softcap=2.0)
    assert_close(out, reference(q, k, v, cu, 9, window=4, softcap=2.0), torch.float64)


@pytest.mark.parametrize("kw", [dict(window=4, causal=False), dict(window=0), dict(window=-3), dict(window=2.5),
                                dict(window=True), dict(softcap=0.0), dict(softcap=-1.0),
                                dict(softcap=float("inf"))])
def test_window_and_softcap_argument_checks(kw):
    q = torch.randn(5, 2, 32)
    kv = torch.randn(5, 1, 32)
    cu = _cu([2, 3])
    with pytest.raises(ValueError):
        varlen_attention(q, kv, kv, cu, 3, **kw)
    with pytest.raises(ValueError):
        reference(q, kv, kv, cu, 3, **kw)


# ---------------------------------------------------------------------------------------------
# GPU: bfloat16 at realistic sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

def _lognormal_lengths(n_tokens, median=400, cap=4096, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n_tokens:
        n = int(torch.empty(1).log_normal_(math.log(median), 1.0, generator=gen).clamp(1, cap).item())
        lengths.append(min(n, n_tokens - sum(lengths)))
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,causal", [(128, 32, 8, True), (64, 16, 16, True), (80, 14, 2, True),
                                            (96, 12, 4, False), (256, 8, 1, True), (128, 28, 4, False)])
def test_gpu_bf16_against_float64_and_sdpa(d, hq, hkv, causal):
    lengths = _lognormal_lengths(4096 if d < 256 else 2048, seed=d + hq)
    lengths = [1, 1, 1] + lengths  # documents of length 1 too
    q, k, v = _inputs(lengths, hq, hkv, d, device="cuda", strided=True)
    cu = _cu(lengths, "cuda")
    max_seqlen = max(lengths)
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    ref = _run(reference, q, k, v, dout, cu, max_seqlen, causal, torch.float64)
    stock = _run(reference, q, k, v, dout, cu, max_seqlen, causal, torch.bfloat16)
    with expect_triton("varlen_attention"):
        ours = _run(varlen_attention, q, k, v, dout, cu, max_seqlen, causal, torch.bfloat16)
    for name, o, s, r in zip(NAMES, ours, stock, ref, strict=True):
        err, stock_err = rel_err(o, r), rel_err(s, r)
        assert err < TOL[torch.bfloat16], f"{name}: {err:.2e}"
        assert err <= 1.5 * stock_err + 1e-3, f"{name}: {err:.2e} vs torch SDPA bf16 {stock_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,window,softcap", [
    (128, 32, 8, 512, None),  # Mistral-style window, shorter than many documents
    (256, 8, 4, 1024, None),  # Gemma 3 local layers
    (256, 16, 8, 4096, 50.0),  # Gemma 2 local layers (the window exceeds every document here)
    (256, 16, 8, 300, 50.0),
    (256, 16, 8, None, 50.0),  # Gemma 2 global layers
])
def test_gpu_bf16_window_softcap(d, hq, hkv, window, softcap):
    lengths = [1, 1] + _lognormal_lengths(2048, median=600, seed=d + hq)
    q, k, v = _inputs(lengths, hq, hkv, d, device="cuda", strided=True)
    cu = _cu(lengths, "cuda")
    max_seqlen = max(lengths)
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    kw = dict(window=window, softcap=softcap)
    ref = _run(reference, q, k, v, dout, cu, max_seqlen, True, torch.float64, **kw)
    stock = _run(reference, q, k, v, dout, cu, max_seqlen, True, torch.bfloat16, **kw)
    with expect_triton("varlen_attention"):
        ours = _run(varlen_attention, q, k, v, dout, cu, max_seqlen, True, torch.bfloat16, **kw)
    for name, o, s, r in zip(NAMES, ours, stock, ref, strict=True):
        err, stock_err = rel_err(o, r), rel_err(s, r)
        assert err < TOL[torch.bfloat16], f"{name}: {err:.2e}"
        assert err <= 1.5 * stock_err + 1e-3, f"{name}: {err:.2e} vs torch bf16 {stock_err:.2e}"


@pytest.mark.gpu
def test_gpu_deterministic_bf16():
    lengths = _lognormal_lengths(8192, seed=3)
    q, k, v = _inputs(lengths, 32, 8, 128, device="cuda")
    cu = _cu(lengths, "cuda")
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    runs = [_run(varlen_attention, q, k, v, dout, cu, max(lengths), True, torch.bfloat16, deterministic=True)
            for _ in range(2)]
    for name, a, b in zip(NAMES, *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """T * Hq * D > 2^31: the last documents lie past the int32 range of element offsets."""
    hq, hkv, d = 16, 1, 128
    n_tokens = 2**31 // (hq * d) + 4096
    q = torch.randn(n_tokens, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(n_tokens, hkv, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(n_tokens, hkv, d, dtype=torch.bfloat16, device="cuda")
    # 1024-token documents keep the work small; the last two are checked against the reference
    lengths = [1024] * ((n_tokens - 2100) // 1024)
    lengths += [n_tokens - sum(lengths) - 1400, 700, 700]
    cu = _cu(lengths, "cuda")
    with expect_triton("varlen_attention"):
        out = varlen_attention(q, k, v, cu, max(lengths))
    tail = slice(n_tokens - 1400, n_tokens)
    tail_cu = _cu([700, 700], "cuda")
    ref = reference(q[tail].double(), k[tail].double(), v[tail].double(), tail_cu, 700)
    assert_close(out[tail], ref, torch.bfloat16, "out past 2^31 elements")

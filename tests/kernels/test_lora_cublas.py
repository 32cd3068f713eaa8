"""The cuBLAS LoRA path (kernels/lora_cublas.py) and its RMSNorm producer (kernels/rms_norm_lora.py): forward
and every gradient against a float64 reference in float32 and float16 (CPU: torch's BLAS; the producer
through Triton's interpreter), odd shapes, ranks 1 to 64, groups of one, two and three, bias and none, the
[W | B] buffer read in one GEMM, and the path selection."""

import json

import pytest
import torch

from lorafuse.kernels import _lora_gemm_select as select
from lorafuse.kernels._launch import launches
from lorafuse.kernels.lora_cublas import (
    AugmentedLinearFunction,
    CublasLoraFunction,
    f32_mm,
    forced_path,
    lora_gemm_path,
    register_augmented,
)
from lorafuse.kernels.lora_linear import (
    _Plan,
    lora_linear,
    lora_linear_group,
    lora_linear_group_reference,
    lora_mlp,
    lora_mlp_reference,
)
from lorafuse.kernels.rms_norm_lora import rms_norm_lowrank, rms_norm_lowrank_reference

from kernel_utils import TOL, assert_close, expect_triton, poison_outputs, rel_err

DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def cublas(monkeypatch):
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "cublas")
    monkeypatch.delenv("LORAFUSE_KERNELS", raising=False)


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype).double()


def _grads(outs, leaves, dys):
    used = [(o, dy) for o, dy in zip(outs, dys, strict=True) if dy is not None]
    return torch.autograd.grad([o for o, _ in used], leaves, [dy.to(o.dtype) for o, dy in used])


def _case(dtype, T, K, splits, ranks, bias):
    """Inputs in float64 (values exact in dtype): x, the stacked weight, bias, float32-master adapters."""
    x = rand(T, K, dtype=dtype)
    w = rand(sum(splits), K, dtype=dtype, scale=K ** -0.5)
    b = rand(sum(splits), dtype=dtype) if bias else None
    As = [rand(r, K, dtype=dtype, scale=K ** -0.5) if r else None for r in ranks]
    Bs = [rand(n, r, dtype=dtype, scale=0.5) if r else None for n, r in zip(splits, ranks, strict=True)]
    scalings = [0.5 + i for i in range(len(splits))]
    dys = [rand(T, n, dtype=dtype) for n in splits]
    return x, w, b, As, Bs, scalings, dys


def _run_group(fn, case, dtype, master_dtype):
    x, w, b, As, Bs, scalings, dys = case
    xx = x.to(dtype).requires_grad_()
    ad = [t.to(master_dtype).requires_grad_() if t is not None else None for t in As + Bs]
    As_, Bs_ = ad[:len(As)], ad[len(As):]
    outs = fn(xx, w.to(dtype), As_, Bs_, scalings, [d.shape[1] for d in dys], b.to(dtype) if b is not None else None)
    leaves = [xx] + [t for t in ad if t is not None]
    return outs, _grads(outs, leaves, dys), [t for t in ad if t is not None]


GROUPS = [  # (splits, ranks): one, two and three members, ranks 1..64, a member without adapter
    ((37,), (1,)),
    ((19,), (64,)),
    ((23, 9), (7, 0)),
    ((33, 17, 17), (16, 16, 16)),
    ((5, 1, 12), (3, 0, 64)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("splits", "ranks"), GROUPS)
@pytest.mark.parametrize("bias", [False, True])
def test_group_matches_float64(cublas, dtype, splits, ranks, bias):
    case = _case(dtype, 29, 45, splits, ranks, bias)
    before = launches["lora_cublas"]
    outs, grads, masters = _run_group(lora_linear_group, case, dtype, torch.float32)
    assert launches["lora_cublas"] == before + 1  # this path ran, not lora_linear.py's kernels
    ref_outs, ref_grads, _ = _run_group(lora_linear_group_reference, case, torch.float64, torch.float64)
    # the same computation in stock PyTorch at dtype: the low-precision bar (DESIGN.md)
    stock_outs, stock_grads, _ = _run_group(lora_linear_group_reference, case, dtype,
                                            dtype)
    for i, (o, r, s) in enumerate(zip(outs, ref_outs, stock_outs, strict=True)):
        assert o.dtype == dtype
        assert_close(o, r, dtype, f"y[{i}]", tol=max(TOL[dtype], 2 * rel_err(s, r)))
    for i, (g, r, s) in enumerate(zip(grads, ref_grads, stock_grads, strict=True)):
        assert_close(g, r, dtype, f"grad[{i}]", tol=max(TOL[dtype], 2 * rel_err(s, r)))
    for m, g in zip(masters, grads[1:], strict=True):  # float32 masters get float32 gradients
        assert g.dtype == torch.float32 == m.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_lora_linear_with_leading_dims_and_rank_zero(cublas, dtype):
    x = rand(2, 3, 17, dtype=dtype).to(dtype).requires_grad_()
    w = rand(11, 17, dtype=dtype).to(dtype)
    a = rand(5, 17, dtype=dtype).float().requires_grad_()
    b = rand(11, 5, dtype=dtype).float().requires_grad_()
    y = lora_linear(x, w, a, b, 2.0)
    ref = x.double() @ w.double().t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    assert y.shape == (2, 3, 11)
    assert_close(y, ref, dtype)
    dy = torch.randn(2, 3, 11)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy.to(dtype))
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    rd = xd @ w.double().t() + 2.0 * (xd @ ad.t()) @ bd.t()
    for g, r in zip((gx, ga, gb), torch.autograd.grad(rd, (xd, ad, bd), dy.double()), strict=True):
        assert_close(g, r, dtype)
    plain = lora_linear(x, w, None, None, 0.0)
    assert_close(plain, x.double() @ w.double().t(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(("r_gate", "r_up", "r_down"), [(4, 4, 4), (1, 0, 64), (0, 0, 0)])
def test_mlp_matches_float64(cublas, dtype, activation, r_gate, r_up, r_down):
    T, H, inter = 21, 19, 27
    x = rand(T, H, dtype=dtype)
    gu = rand(2 * inter, H, dtype=dtype, scale=H ** -0.5)
    down = rand(H, inter, dtype=dtype, scale=inter ** -0.5)

    def adapter(r, n, k):
        return (rand(r, k, dtype=dtype, scale=k ** -0.5), rand(n, r, dtype=dtype, scale=0.5)) if r else (None, None)

    ads = [*adapter(r_gate, inter, H), *adapter(r_up, inter, H), *adapter(r_down, H, inter)]
    dy = rand(T, H, dtype=dtype)

    def run(fn, dt, master):
        xx = x.to(dt).requires_grad_()
        a = [t.to(master).requires_grad_() if t is not None else None for t in ads]
        y = fn(xx, gu.to(dt), a[0], a[1], 0.5, a[2], a[3], 2.0, down.to(dt), a[4], a[5], 1.5, activation=activation)
        leaves = [xx] + [t for t in a if t is not None]
        return y, torch.autograd.grad(y, leaves, dy.to(dt))

    before = launches["lora_cublas"]
    y, grads = run(lora_mlp, dtype, torch.float32)
    assert launches["lora_cublas"] > before
    ry, rgrads = run(lora_mlp_reference, torch.float64, torch.float64)
    sy, sgrads = run(lora_mlp_reference, dtype, dtype)
    assert_close(y, ry, dtype, "y", tol=max(TOL[dtype], 2 * rel_err(sy, ry)))
    for i, (g, r, s) in enumerate(zip(grads, rgrads, sgrads, strict=True)):
        assert_close(g, r, dtype, f"grad[{i}]", tol=max(TOL[dtype], 2 * rel_err(s, r)))


def _registered(w, splits, Bs, R):
    """A [W | B] buffer for w (block-diagonal Bs) and w as the view of its first K columns."""
    N, K = w.shape
    wb = torch.zeros(N, K + R, dtype=w.dtype)
    wb[:, :K] = w
    plan = _Plan.make(tuple(splits), tuple(b.shape[1] if b is not None else 0 for b in Bs), (1.0,) * len(splits))
    for b, off, n, r_off, r in zip(Bs, plan.offsets, plan.splits, plan.r_offsets, plan.ranks, strict=True):
        if r:
            wb[off:off + n, K + r_off:K + r_off + r] = b
    view = wb[:, :K]
    register_augmented(view, wb)
    return view, wb, plan


def test_registered_buffer_is_read_in_one_gemm_and_its_b_columns_count(cublas, monkeypatch):
    T, K, splits, ranks = 13, 21, (8, 5), (3, 2)
    x, w, _, As, Bs, _, dys = _case(torch.float32, T, K, splits, ranks, False)
    x, w = x.float(), w.float()
    As, Bs = [a.float().requires_grad_() for a in As], [b.float().requires_grad_() for b in Bs]
    view, wb, plan = _registered(w, splits, [b.detach() for b in Bs], sum(ranks))
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: (calls.append((tuple(a.shape), tuple(b.shape))),
                                                          real_mm(a, b, **kw))[1])
    xx = x.clone().requires_grad_()
    outs = lora_linear_group(xx, view, As, Bs, [1.0, 1.0], splits)
    grads = _grads(outs, [xx, *As, *Bs], [d.float() for d in dys])
    assert ((T, sum(splits)), (sum(splits), K + sum(ranks))) in calls  # backward: dY [W | B] in one GEMM
    monkeypatch.setattr(torch, "mm", real_mm)
    ref_outs, ref_grads, _ = _run_group(lora_linear_group_reference, (x.double(), w.double(), None,
                                        [a.detach().double() for a in As], [b.detach().double() for b in Bs],
                                        [1.0, 1.0], dys), torch.float64, torch.float64)
    for o, r in zip(outs, ref_outs, strict=True):
        assert_close(o, r, torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, torch.float32)
    # the B it multiplies by is the buffer's: a stale buffer gives another result (what lora_gemm.py refreshes)
    wb[:, K:] *= 2
    stale = lora_linear_group(x, view, As, Bs, [1.0, 1.0], splits)
    assert rel_err(stale[0], ref_outs[0]) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_augmented_linear_one_gemm_equals_two(monkeypatch, dtype):
    """[x | U] in one buffer and a registered [W | B]: one GEMM, K + R deep; the same as x W^T + U B^T."""
    poison_outputs(monkeypatch)  # the two-GEMM backward fills one [dx | dU] buffer: every element must be written
    T, K, splits, ranks = 17, 30, (12, 7), (4, 0)
    _, w, _, _, Bs, _, dys = _case(dtype, T, K, splits, ranks, False)
    w = w.to(dtype)
    view, wb, plan = _registered(w, splits, [b.to(dtype) if b is not None else None for b in Bs], 4)
    buf = rand(T, K + 4, dtype=dtype).to(dtype)
    masters = [b.float().requires_grad_() if b is not None else None for b in Bs]
    x, u = buf[:, :K].requires_grad_(), buf[:, K:].requires_grad_()
    one = AugmentedLinearFunction.apply(x, u, view, None, plan, *masters)
    x2, u2 = buf[:, :K].clone().requires_grad_(), buf[:, K:].clone().requires_grad_()
    two = AugmentedLinearFunction.apply(x2, u2, w.clone(), None, plan, *masters)  # no buffer: two GEMMs
    ref = buf.double() @ wb.double().t()
    for a, b, r in zip(one, two, ref.split(list(splits), 1), strict=True):
        assert_close(a, r, dtype)
        assert_close(b, r, dtype)
    g1 = _grads(one, [x, u, masters[0]], [d.to(dtype) for d in dys])
    g2 = _grads(two, [x2, u2, masters[0]], [d.to(dtype) for d in dys])
    dy = torch.cat(dys, 1)
    refs = [(dy @ wb.double())[:, :K], (dy @ wb.double())[:, K:], dys[0].t() @ buf[:, K:].double()]
    for a, b, r in zip(g1, g2, refs, strict=True):
        assert_close(a, r, dtype)
        assert_close(b, r, dtype)
    assert g1[2].dtype == torch.float32


# ----------------------------------------------------------------------------- the RMSNorm producer


def _check_producer(op, run, fn, reference, width, R, dtype):
    """A producer's (out, U) and gradients, run(fn, dtype) through its Triton kernel, against run(reference) in
    float64: out and U the two column blocks of one buffer [out | U] (out `width` wide), U's float32 master
    getting a float32 gradient."""
    with expect_triton(op):
        outs, grads = run(fn, dtype)
    ref_outs, ref_grads = run(reference, torch.float64)
    if R:
        assert outs[1].data_ptr() == outs[0].data_ptr() + width * outs[0].element_size()  # one buffer
        assert grads[1].dtype == torch.float32
    for o, r in zip(outs, ref_outs, strict=True):
        assert_close(o, r, dtype)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "R"), [(1, 33, 1), (19, 77, 5), (40, 64, 48), (7, 130, 64), (5, 16, 0)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_lowrank_through_the_interpreter(monkeypatch, dtype, T, K, R, offset):
    poison_outputs(monkeypatch)
    x = rand(T, K, dtype=dtype)
    w = rand(K, dtype=dtype, scale=0.3) + (0.0 if offset else 1.0)
    a = rand(R, K, dtype=dtype, scale=K ** -0.5) if R else None
    s = torch.rand(R, dtype=torch.float64) + 0.5 if R else None
    dy, du = rand(T, K, dtype=dtype), (rand(T, R, dtype=dtype) if R else None)

    def run(fn, dt):
        xx = x.to(dt).requires_grad_()
        aa = a.float().requires_grad_() if R else None
        y, u = fn(xx, w.to(dt), 1e-5, offset, aa, s.float() if R else None)
        outs, leaves = [y] + ([u] if R else []), [xx] + ([aa] if R else [])
        gs = [dy.to(dt)] + ([du.to(dt)] if R else [])
        return outs, torch.autograd.grad(outs, leaves, gs)

    _check_producer("rms_norm_lowrank", run, rms_norm_lowrank, rms_norm_lowrank_reference, K, R, dtype)


def test_rms_norm_lowrank_refuses_a_trained_norm_weight():
    with pytest.raises(ValueError, match="frozen"):
        rms_norm_lowrank(torch.randn(3, 8), torch.ones(8, requires_grad=True), 1e-5, 0.0, None, None)


# ----------------------------------------------------------------------------- selection


def test_path_selection(monkeypatch, tmp_path):
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    monkeypatch.delenv("LORAFUSE_LORA_GEMM", raising=False)
    assert lora_gemm_path(x, w) == "triton"  # CPU, auto: today's dispatch
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "cublas")
    assert lora_gemm_path(x, w) == "cublas"
    with forced_path("triton"):
        assert lora_gemm_path(x, w) == "triton"
    trained = w.clone().requires_grad_()
    assert lora_gemm_path(x, trained) == "triton"  # a weight that trains: the Triton path has dW
    from lorafuse.kernels.nf4 import quantize_nf4

    nf4 = quantize_nf4(torch.randn(4, 64))
    assert lora_gemm_path(torch.randn(2, 64), nf4) == "triton"  # NF4: the Triton GEMMs dequantize it
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "fastest")
    with pytest.raises(ValueError, match="LORAFUSE_LORA_GEMM"):
        lora_gemm_path(x, w)


def test_measured_choice_reads_the_recorded_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    assert select.measured_choice("GPU X", [(4096, 6144)]) is None
    record = {"GPU X": {select.shape_key(16384, 4096, 6144, 48): {"triton_ms": 3.0, "cublas_ms": 2.0, "bare_ms": 1.9},
                        select.shape_key(16384, 14336, 4096, 16): {"triton_ms": 1.0, "cublas_ms": 1.5,
                                                                   "bare_ms": 0.9}}}
    (tmp_path / select.CHOICE_FILE).write_text(json.dumps(record))
    assert select.measured_choice("GPU X", [(4096, 6144)]) == "cublas"
    assert select.measured_choice("GPU X", [(14336, 4096)]) == "triton"
    assert select.measured_choice("GPU X", [(4096, 6144), (14336, 4096)]) == "cublas"  # 3.5 ms against 4.0
    assert select.measured_choice("GPU Y", [(4096, 6144)]) is None


def test_f32_mm_keeps_float32():
    a, b = torch.randn(5, 7, dtype=torch.float16), torch.randn(7, 3, dtype=torch.float16)
    out = f32_mm(a, b)
    assert out.dtype == torch.float32
    assert rel_err(out, a.double() @ b.double()) < 1e-6


def test_cublas_function_without_any_gradient_needed(cublas):
    plan = _Plan.make((3,), (2,), (1.0,))
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    y = CublasLoraFunction.apply(x, w, None, plan, torch.randn(2, 5), torch.randn(3, 2))
    assert not y.requires_grad


# ----------------------------------------------------------------------------- the GLU producer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(("T", "inter", "R"), [(1, 33, 1), (21, 50, 16), (17, 40, 64), (5, 24, 0)])
def test_glu_lowrank_through_the_interpreter(monkeypatch, dtype, activation, T, inter, R):
    from lorafuse.kernels.swiglu_lora import glu_lowrank, glu_lowrank_reference

    poison_outputs(monkeypatch)
    gu = rand(T, 2 * inter, dtype=dtype)  # g and u as the two halves of the gate/up output, as the engine has them
    a = rand(R, inter, dtype=dtype, scale=inter ** -0.5) if R else None
    dh, du = rand(T, inter, dtype=dtype), (rand(T, R, dtype=dtype) if R else None)

    def run(fn, dt):
        g_all = gu.to(dt).requires_grad_()
        aa = a.float().requires_grad_() if R else None
        h, u = fn(g_all[:, :inter], g_all[:, inter:], aa, 1.5, activation)
        outs, leaves = [h] + ([u] if R else []), [g_all] + ([aa] if R else [])
        return outs, torch.autograd.grad(outs, leaves, [dh.to(dt)] + ([du.to(dt)] if R else []))

    _check_producer("glu_lowrank", run, glu_lowrank, glu_lowrank_reference, inter, R, dtype)


def test_group_of_three_with_one_token(cublas):
    case = _case(torch.float32, 1, 45, (33, 17, 17), (16, 1, 64), True)
    outs, grads, _ = _run_group(lora_linear_group, case, torch.float32, torch.float32)
    ref_outs, ref_grads, _ = _run_group(lora_linear_group_reference, case, torch.float64, torch.float64)
    for o, r in zip([*outs, *grads], [*ref_outs, *ref_grads], strict=True):
        assert_close(o, r, torch.float32)


# ----------------------------------------------------------------------------- bf16 on a GPU (make test-gpu)


def _to(case, device):
    return tuple([t.to(device) if t is not None else None for t in v] if isinstance(v, list)
                 else (v.to(device) if isinstance(v, torch.Tensor) else v) for v in case)


@pytest.mark.gpu
@pytest.mark.parametrize(("splits", "ranks"), [((4096, 1024, 1024), (16, 16, 16)), ((4096,), (16,))])
def test_group_bf16_on_gpu(cublas, splits, ranks):
    case = _to(_case(torch.bfloat16, 2048, 4096, splits, ranks, False), "cuda")
    outs, grads, _ = _run_group(lora_linear_group, case, torch.bfloat16, torch.float32)
    ref_outs, ref_grads, _ = _run_group(lora_linear_group_reference, case, torch.float64, torch.float64)
    stock_outs, stock_grads, _ = _run_group(lora_linear_group_reference, case, torch.bfloat16, torch.bfloat16)
    for o, r, s in zip([*outs, *grads], [*ref_outs, *ref_grads], [*stock_outs, *stock_grads], strict=True):
        assert_close(o, r, torch.bfloat16, tol=max(TOL[torch.bfloat16], 2 * rel_err(s, r)))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_producers_bf16_on_gpu(activation):
    from lorafuse.kernels.swiglu_lora import glu_lowrank, glu_lowrank_reference

    T, K, inter, R = 1024, 4096, 14336, 48
    x = rand(T, K, dtype=torch.bfloat16).cuda()
    w = torch.ones(K, dtype=torch.float64, device="cuda")
    a = rand(R, K, dtype=torch.bfloat16, scale=K ** -0.5).cuda()
    s = torch.full((R,), 2.0, dtype=torch.float64, device="cuda")
    for dt in (torch.bfloat16, torch.float64):
        fn = rms_norm_lowrank if dt == torch.bfloat16 else rms_norm_lowrank_reference
        y, u = fn(x.to(dt), w.to(dt), 1e-5, 0.0, a.float(), s.float())
        if dt == torch.bfloat16:
            got = (y, u)
        else:
            assert_close(got[0], y, torch.bfloat16)
            assert_close(got[1], u, torch.bfloat16)
    gu = rand(T, 2 * inter, dtype=torch.bfloat16).cuda()
    ad = rand(16, inter, dtype=torch.bfloat16, scale=inter ** -0.5).cuda()
    h, ud = glu_lowrank(gu[:, :inter].bfloat16(), gu[:, inter:].bfloat16(), ad.float(), 2.0, activation)
    rh, rud = glu_lowrank_reference(gu[:, :inter], gu[:, inter:], ad, 2.0, activation)
    assert_close(h, rh, torch.bfloat16)
    assert_close(ud, rud, torch.bfloat16)

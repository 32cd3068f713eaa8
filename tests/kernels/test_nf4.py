"""NF4 (kernels/nf4.py): the format against a reference written here from its description, bitsandbytes' own
output where it installs, the Triton dequantize kernel through the interpreter, and the LoRA kernels on NF4
weights (forward and gradients against dequantize-then-float64-matmul)."""

import importlib

import numpy as np
import pytest
import torch

from kernel_utils import assert_close, expect_triton, poison_outputs

nf4 = importlib.import_module("lorafuse.kernels.nf4")
lora_module = importlib.import_module("lorafuse.kernels.lora_linear")

ODD_SHAPES = [(1, 1), (3, 5), (37, 51), (64, 100), (5, 1024), (130, 129)]


# ----------------------------------------------------------------------------- an independent reference


def normal_map() -> np.ndarray:
    """NF4 from its definition (QLoRA): quantiles of N(0, 1), 8 on the positive side and 7 on the negative,
    from probability 0.9677 to 1/2 (exclusive), an exact zero, all divided by the largest."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return np.sort((values / values.max()).numpy())


def nearest(values: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value; the first (lower) one on a tie."""
    return np.abs(values[:, None].astype(np.float64) - code[None, :].astype(np.float64)).argmin(1)


def blockwise(flat: np.ndarray, size: int, code: np.ndarray):
    """(absmax per block, code index per value): blocks of `size` consecutive values, the last one short."""
    absmax, idx = [], []
    for start in range(0, len(flat), size):
        block = flat[start:start + size]
        amax = np.float32(np.abs(block).max())
        inv = np.float32(1.0) / np.float32(max(amax, np.float32(1e-38)))
        idx.append(nearest((block * inv).astype(np.float32), code))
        absmax.append(amax)
    return np.array(absmax, dtype=np.float32), np.concatenate(idx)


def reference_quantize(w: torch.Tensor, offset=None):
    """bitsandbytes' NF4 with double quantization, from the format description, in numpy. offset: the mean of
    the absmax values to centre them on (float32 sums depend on their order: pass the one to compare with)."""
    flat = w.float().reshape(-1).numpy()
    code = np.array(nf4.NF4_CODE, dtype=np.float32)
    absmax, idx = blockwise(flat, 64, code)
    if len(idx) % 2:
        idx = np.append(idx, 7)  # the pad value 0.0 has code 7
    packed = ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)  # first value in the high nibble
    offset = np.float32(absmax.mean(dtype=np.float64) if offset is None else offset)
    absmax2, qabs = blockwise((absmax - offset).astype(np.float32), 256, nf4.dynamic_map().numpy())
    return packed, qabs.astype(np.uint8), absmax2, offset


def reference_dequantize(packed, qabs, absmax2, offset, n, nested_code=None):
    code = np.array(nf4.NF4_CODE, dtype=np.float32)
    nested_code = nf4.dynamic_map().numpy() if nested_code is None else nested_code
    codes = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    scale = (nested_code[qabs] * np.repeat(absmax2, 256)[:len(qabs)]).astype(np.float32) + offset
    return code[codes] * np.repeat(scale.astype(np.float32), 64)[:n]


# ----------------------------------------------------------------------------- the format


def test_the_codebooks_are_the_published_ones():
    assert np.abs(np.array(nf4.NF4_CODE) - normal_map()).max() < 2e-7
    assert nf4.NF4_CODE[7] == 0.0 and nf4.NF4_CODE[0] == -1.0 and nf4.NF4_CODE[15] == 1.0
    dyn = nf4.dynamic_map()
    assert dyn.shape == (256,) and dyn.dtype == torch.float32
    assert torch.all(dyn[1:] > dyn[:-1]), "sorted, no duplicates"
    assert dyn[127] == 0.0 and dyn[255] == 1.0 and abs(dyn[0].item() + 0.99297) < 1e-5
    # signed: the 127 negative values mirror the 127 positive ones below 1
    assert torch.equal(-dyn[:127].flip(0), dyn[128:255])


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_quantize_matches_the_reference_written_from_the_format(shape):
    w = torch.randn(shape) * 0.05
    q = nf4.quantize_nf4(w)
    packed, qabs, absmax2, offset = reference_quantize(w, q.offsets[0].item())
    mean = np.float32(reference_quantize(w)[3])
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == (w.numel() + 1) // 2
    assert np.array_equal(q.packed.numpy(), packed)
    assert np.allclose(q.offsets.numpy(), mean, rtol=1e-6, atol=0)  # the mean of the absmax values
    assert np.array_equal(q.nested_absmax.numpy(), absmax2)
    groups = q.nested_absmax.numel()
    if groups * 256 > q.absmax.numel() or w.numel() > 64:  # a single block's group is degenerate (all 0)
        assert np.array_equal(q.absmax.numpy(), qabs)
    got = nf4.dequantize_nf4_reference(q, torch.float32).reshape(-1).numpy()
    want = reference_dequantize(q.packed.numpy(), q.absmax.numpy(), q.nested_absmax.numpy(),
                                q.offsets[0].item(), w.numel())
    assert np.array_equal(got, want)


def test_nibble_order_and_the_odd_tail():
    """Values 1, -1, 0 of one block: codes 15, 0, 7 packed high nibble first; the pad nibble is 7."""
    q = nf4.quantize_nf4(torch.tensor([[1.0, -1.0, 0.0]]))
    assert q.packed.tolist() == [0xF0, 0x77]
    assert nf4.dequantize_nf4_reference(q, torch.float32).tolist() == [[1.0, -1.0, 0.0]]


@pytest.mark.parametrize("shape", [(64, 100), (37, 51), (300, 256)])
def test_round_trip_error_is_that_of_4_bits(shape):
    w = torch.randn(shape)
    q = nf4.quantize_nf4(w)
    back = nf4.dequantize_nf4_reference(q, torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.03 < rel < 0.15, rel  # NF4 on normal data: about 0.1
    # no value moves by more than half the widest codebook gap (-1 to -0.696) times its block's absmax, plus
    # what the 8-bit absmax moved
    flat = w.reshape(-1)
    true = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % 64)).view(-1, 64).amax(1)
    rebuilt = nf4.block_absmax(q)
    bound = 0.5 * (1 - 0.6961928009986877) * true + (rebuilt - true).abs() + 1e-6
    assert torch.all((back.reshape(-1) - flat).abs() <= bound.repeat_interleave(64)[:flat.numel()])
    assert ((rebuilt - true).abs() / true).max() < 0.02
    # quantizing the dequantized weight again changes nothing but the rebuilt absmax's rounding
    again = nf4.quantize_nf4(back)
    assert (again.packed != q.packed).float().mean() < 0.01


def test_blocks_of_zeros_dequantize_to_exact_zeros():
    w = torch.randn(4, 256)
    w[1, 64:192] = 0.0  # two whole blocks
    q = nf4.quantize_nf4(w)
    assert q.packed[(256 + 64) // 2:(256 + 192) // 2].eq(0x77).all()  # code 7 (0.0) in both nibbles
    back = nf4.dequantize_nf4_reference(q, torch.float32)
    assert back[1, 64:192].eq(0).all()
    zeros = nf4.quantize_nf4(torch.zeros(3, 70))
    assert nf4.dequantize_nf4_reference(zeros, torch.float32).eq(0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(bad):
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: 1 NaN or inf"):
        nf4.quantize_nf4(w, "model.layers.0.mlp.down_proj.weight")


def test_buffers_that_do_not_fit_the_shape_are_refused():
    q = nf4.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="packed has 256 values, expected 512"):
        nf4.NF4Weight(q.packed, q.absmax, q.nested_absmax, q.offsets, q.code, q.nested_code, (16, 64), q.dtype)


def test_stacked_weights_dequantize_as_their_parts():
    parts = [nf4.quantize_nf4(torch.randn(n, 256)) for n in (128, 64, 64)]  # 32768 / 16384 values: aligned
    alone = [nf4.dequantize_nf4_reference(p, torch.float32) for p in parts]
    stacked = nf4.stack_nf4(parts)
    assert stacked.shape == (256, 256)
    assert torch.equal(nf4.dequantize_nf4_reference(stacked, torch.float32), torch.cat(alone))
    assert parts[1].packed.data_ptr() == stacked.packed.data_ptr() + 128 * 256 // 2  # views, not copies
    assert torch.equal(nf4.dequantize_nf4_reference(parts[2], torch.float32), alone[2])
    assert nf4.stack_nf4([nf4.quantize_nf4(torch.randn(n, 100)) for n in (3, 5)]) is None  # blocks straddle


# ----------------------------------------------------------------------------- bitsandbytes itself


def _bitsandbytes():
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as e:  # noqa: BLE001 - any failure to import or load its library means: cannot compare here
        pytest.skip(f"bitsandbytes does not import here ({type(e).__name__}: {str(e)[:100]})")
    return bnb_functional


@pytest.mark.parametrize("shape,dtype", [((64, 100), torch.bfloat16), ((37, 51), torch.float32),
                                         ((300, 4096), torch.bfloat16), ((7, 91), torch.float16)])
def test_bytes_and_values_equal_bitsandbytes(shape, dtype):
    """quantize_4bit(..., quant_type="nf4", compress_statistics=True, blocksize=64) on its CPU backend.

    The 4-bit codes, the absmax of each group and the offset are the same bytes. The 8-bit codes of the absmax
    are too, except where bitsandbytes' CPU search does not pick the nearest code of the dynamic map (a few
    in a thousand; its CUDA kernel, which ours follows, does): there ours is the nearer one. Their state read
    by our dequantizer gives their values bit for bit."""
    bnb = _bitsandbytes()
    w = torch.randn(shape).to(dtype)
    try:
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        theirs = bnb.dequantize_4bit(packed, state)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes cannot quantize on this CPU ({type(e).__name__}: {str(e)[:100]})")
    ours = nf4.quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert ours.offsets[0].item() == state.offset.item()
    assert torch.equal(ours.code, state.code) and torch.equal(ours.nested_code, state.state2.code)
    differ = ours.absmax != state.absmax
    assert differ.float().mean() < 0.05
    if differ.any():
        true = torch.nn.functional.pad(w.float().reshape(-1).abs(), (0, -w.numel() % 64)).view(-1, 64).amax(1)
        group = torch.arange(true.numel()) // 256
        offset, absmax2 = state.offset, state.state2.absmax[group]
        ours_err = (ours.nested_code[ours.absmax.long()] * absmax2 + offset - true).abs()
        their_err = (ours.nested_code[state.absmax.long()] * absmax2 + offset - true).abs()
        assert torch.all(ours_err[differ] <= their_err[differ])
    same_blocks = (~differ).repeat_interleave(64)[:w.numel()].view(shape)
    ours_values = nf4.dequantize_nf4_reference(ours, dtype)
    assert torch.equal(ours_values[same_blocks], theirs[same_blocks])
    read = nf4.NF4Weight(packed.view(-1), state.absmax, state.state2.absmax,
                         state.offset.expand(state.state2.absmax.numel()).clone(), state.code, state.state2.code,
                         shape, dtype)
    assert torch.equal(nf4.dequantize_nf4_reference(read, dtype), theirs)
    if dtype != torch.bfloat16:  # the interpreter's bfloat16 is not IEEE rounding (DESIGN.md)
        assert torch.equal(nf4.dequantize_nf4(read, dtype), theirs)


# ----------------------------------------------------------------------------- the Triton kernel (interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 51), (33, 1000)])
@pytest.mark.parametrize("nested", [True, False])
def test_triton_dequantize_equals_the_reference_bit_for_bit(monkeypatch, dtype, shape, nested):
    poison_outputs(monkeypatch)
    q = nf4.quantize_nf4(torch.randn(shape), double_quant=nested)
    with expect_triton("dequantize_nf4"):
        out = nf4.dequantize_nf4(q, dtype)
    assert out.shape == shape and out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, nf4.dequantize_nf4_reference(q, dtype))


def test_the_reference_runs_where_triton_is_not_asked_for(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    q = nf4.quantize_nf4(torch.randn(5, 70))
    from lorafuse.kernels._launch import launches

    before = launches["dequantize_nf4"]
    assert torch.equal(nf4.dequantize_nf4(q), nf4.dequantize_nf4_reference(q))
    assert launches["dequantize_nf4"] == before


# ----------------------------------------------------------------------------- LoRA kernels on NF4 weights


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype).double().requires_grad_()


def _no_dense_weight_saved(fn, weight_shape):
    """Run fn under a saved-tensors hook; fail if autograd keeps a tensor of the weight's shape."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    assert tuple(weight_shape) not in seen, f"a dense {tuple(weight_shape)} weight was saved for backward"
    return out


def _check(op, run, inputs64, weight_shapes, dtype, nf4_op="dequantize_nf4"):
    """run(inputs, dense) in dtype on NF4 weights (Triton) against float64 on the dequantized weights; nf4_op is
    the kernel that reads the NF4 weight (dequantize_nf4, or nf4_matmul with LORAFUSE_NF4_GEMM=fused)."""
    ref_out = run(inputs64, True)
    dys = [torch.randn(o.shape).to(dtype).double() for o in ref_out]
    leaves = [t for t in inputs64.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_grads = torch.autograd.grad(ref_out, leaves, dys)
    low = {k: v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v
           for k, v in inputs64.items()}
    low_leaves = [low[k] for k, v in inputs64.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    with expect_triton(op), expect_triton(nf4_op, at_least=2):  # forward, and again in backward
        outs = _no_dense_weight_saved(lambda: run(low, False), weight_shapes[0])
        grads = torch.autograd.grad(outs, low_leaves, [d.to(dtype) for d in dys])
    for i, (o, r) in enumerate(zip(outs, ref_out, strict=True)):
        assert o.dtype == dtype
        assert_close(o, r, dtype, f"out{i}")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(g, r, dtype, f"grad{i}")


def _weights(shapes):
    """NF4 weights and their float64 dequantized copies."""
    qs = [nf4.quantize_nf4(torch.randn(s) * s[1] ** -0.5) for s in shapes]
    return qs, [nf4.dequantize_nf4_reference(q, torch.float64) for q in qs]


MODES = [("dequantize", "dequantize_nf4"), ("fused", "nf4_matmul")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("mode,nf4_op", MODES)
def test_lora_linear_on_an_nf4_weight(monkeypatch, dtype, rank, mode, nf4_op):
    poison_outputs(monkeypatch)
    monkeypatch.setenv("LORAFUSE_NF4_GEMM", mode)
    T, K, N = 33, 70, 45
    (q,), (dense,) = _weights([(N, K)])
    inputs = dict(x=_rand(T, K, dtype=dtype), bias=_rand(N, dtype=dtype))
    if rank:
        inputs.update(a=_rand(rank, K, dtype=dtype, scale=K ** -0.5), b=_rand(N, rank, dtype=dtype, scale=0.5))

    def run(t, dense_path):
        fn = lora_module.lora_linear_reference if dense_path else lora_module.lora_linear
        return (fn(t["x"], dense if dense_path else q, t.get("a"), t.get("b"), 2.0, t["bias"]),)

    _check("lora_linear", run, inputs, [(N, K)], dtype, nf4_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,nf4_op", MODES)
def test_lora_linear_group_on_a_stacked_nf4_weight(monkeypatch, dtype, mode, nf4_op):
    poison_outputs(monkeypatch)
    monkeypatch.setenv("LORAFUSE_NF4_GEMM", mode)
    T, K, splits, ranks = 21, 64, (256, 256, 64), (2, 0, 3)  # parts of 16384 values: they stack
    qs, denses = _weights([(n, K) for n in splits])
    stacked = nf4.stack_nf4(qs)
    assert stacked is not None
    dense = torch.cat(denses)
    inputs = dict(x=_rand(T, K, dtype=dtype))
    for i, (n, r) in enumerate(zip(splits, ranks, strict=True)):
        if r:
            inputs[f"a{i}"] = _rand(r, K, dtype=dtype, scale=K ** -0.5)
            inputs[f"b{i}"] = _rand(n, r, dtype=dtype, scale=0.5)

    def run(t, dense_path):
        lora_as = [t.get(f"a{i}") for i in range(3)]
        lora_bs = [t.get(f"b{i}") for i in range(3)]
        fn = lora_module.lora_linear_group_reference if dense_path else lora_module.lora_linear_group
        return fn(t["x"], dense if dense_path else stacked, lora_as, lora_bs, [2.0, 1.0, 0.5], splits)

    _check("lora_linear_group", run, inputs, [(sum(splits), K)], dtype, nf4_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,nf4_op", MODES)
def test_lora_mlp_on_nf4_weights(monkeypatch, dtype, mode, nf4_op):
    poison_outputs(monkeypatch)
    monkeypatch.setenv("LORAFUSE_NF4_GEMM", mode)
    T, H, I = 17, 48, 40
    (gate_up, down), (gate_up64, down64) = _weights([(2 * I, H), (H, I)])
    inputs = dict(x=_rand(T, H, dtype=dtype), ga=_rand(2, H, dtype=dtype, scale=H ** -0.5),
                  gb=_rand(I, 2, dtype=dtype, scale=0.5), da=_rand(3, I, dtype=dtype, scale=I ** -0.5),
                  db=_rand(H, 3, dtype=dtype, scale=0.5))

    def run(t, dense_path):
        fn = lora_module.lora_mlp_reference if dense_path else lora_module.lora_mlp
        gu, dn = (gate_up64, down64) if dense_path else (gate_up, down)
        return (fn(t["x"], gu, t["ga"], t["gb"], 2.0, None, None, 0.0, dn, t["da"], t["db"], 1.5),)

    _check("lora_mlp", run, inputs, [(2 * I, H)], dtype, nf4_op)


def test_the_reference_path_keeps_no_dense_weight_either():
    q = nf4.quantize_nf4(torch.randn(40, 64))
    x = torch.randn(9, 64, requires_grad=True)
    y = _no_dense_weight_saved(lambda: lora_module.lora_linear_reference(x, q, None, None, 0.0), (40, 64))
    (dx,) = torch.autograd.grad(y.sum(), [x])
    dense = nf4.dequantize_nf4_reference(q, torch.float32)
    assert torch.allclose(y, x @ dense.T) and torch.allclose(dx, torch.ones(9, 40) @ dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transpose", [True, False])
def test_the_fused_nf4_gemm_equals_dequantize_then_matmul(monkeypatch, dtype, transpose):
    poison_outputs(monkeypatch)
    M, out_f, in_f = 33, 45, 70
    q = nf4.quantize_nf4(torch.randn(out_f, in_f))
    dense = nf4.dequantize_nf4_reference(q, torch.float64)
    K, N = (in_f, out_f) if transpose else (out_f, in_f)
    a = torch.randn(M, K).to(dtype)
    e, f = torch.randn(M, 5).to(dtype), torch.randn(5, N).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    with expect_triton("nf4_matmul"):
        nf4.nf4_matmul(out, a, q, transpose=transpose, bias=bias, lowrank=(e, f, (f.stride(0), f.stride(1))))
    ref = a.double() @ (dense.T if transpose else dense) + e.double() @ f.double() + bias.double()
    assert_close(out, ref, dtype)

"""LoRA projections of an rms_norm output handed `normed_from` (rms_norm.NormedInput): they keep the norm's input,
not its output, and rebuild the output in backward. Same outputs and gradients as keeping the output (Triton
interpreter, float32 and float16, odd shapes; bfloat16 on GPU), and the output's storage is not kept."""

import pytest
import torch

from lorafuse.kernels.lora_linear import lora_linear_group, lora_mlp
from lorafuse.kernels.rms_norm import NormedInput, rms_norm, rms_norm_residual

from kernel_utils import assert_close, expect_triton

DTYPES = [torch.float32, torch.float16]
EPS = 1e-6


@pytest.fixture(autouse=True)
def _triton_gemms(monkeypatch):
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "triton")


def _rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _group_params(K, splits, rank, dtype, device):
    torch.manual_seed(1)
    return dict(weight=_rand(sum(splits), K, dtype=dtype, device=device, scale=K ** -0.5),
                lora_as=[_rand(rank, K, dtype=torch.float32, device=device, scale=K ** -0.5).requires_grad_()
                         for _ in splits],
                lora_bs=[_rand(n, rank, dtype=torch.float32, device=device, scale=rank ** -0.5).requires_grad_()
                         for n in splits],
                scalings=[2.0, 0.5, 1.5][:len(splits)], out_splits=list(splits))


def _mlp_params(H, I, rank, dtype, device):
    torch.manual_seed(2)

    def adapter(n_out, n_in):
        return (_rand(rank, n_in, dtype=torch.float32, device=device, scale=n_in ** -0.5).requires_grad_(),
                _rand(n_out, rank, dtype=torch.float32, device=device, scale=rank ** -0.5).requires_grad_())

    (ga, gb), (ua, ub), (da, db) = adapter(I, H), adapter(I, H), adapter(H, I)
    return dict(gate_up_weight=_rand(2 * I, H, dtype=dtype, device=device, scale=H ** -0.5), gate_a=ga, gate_b=gb,
                gate_scaling=2.0, up_a=ua, up_b=ub, up_scaling=0.5,
                down_weight=_rand(H, I, dtype=dtype, device=device, scale=I ** -0.5), down_a=da, down_b=db,
                down_scaling=1.5)


def _run(project, h, norm_weight, params, normed: bool, residual=None):
    """The norm (plain, or fused with a residual add), its projection with or without normed_from, and the
    gradients of every leaf from fixed output gradients; plus the storages autograd kept."""
    h = h.detach().clone().requires_grad_()
    leaves = [h] + [t for v in params.values() for t in (v if isinstance(v, list) else [v])
                    if isinstance(t, torch.Tensor) and t.requires_grad]
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if residual is None:
            y, source = rms_norm(h, norm_weight, EPS), h
        else:
            y, source = rms_norm_residual(h, residual, norm_weight, EPS)
        outs = project(y, **params, normed_from=NormedInput(source, norm_weight, EPS) if normed else None)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(3)
    dys = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, dys)
    return outs, grads, kept, y.untyped_storage().data_ptr()


def _same(project, h, norm_weight, params, residual=None, exact=True):
    with expect_triton(project.__name__):
        outs, grads, kept, y_storage = _run(project, h, norm_weight, params, True, residual)
    ref_outs, ref_grads, ref_kept, ref_y_storage = _run(project, h, norm_weight, params, False, residual)
    assert ref_y_storage in ref_kept  # without normed_from the norm's output is kept ...
    assert y_storage not in kept  # ... with it, not
    for o, r in zip(outs, ref_outs, strict=True):
        assert torch.equal(o, r)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        # the same kernels on the same rebuilt values: equal, not merely close (a GPU's rms_norm_residual may be
        # tuned to another reduction order than the plain norm that rebuilds its output: close there)
        if exact:
            assert torch.equal(g, r), f"gradient {i}: max diff {(g.float() - r.float()).abs().max().item():.3e}"
        else:
            assert_close(g, r, torch.bfloat16, f"gradient {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_keeps_the_norm_input_not_its_output(dtype):
    T, K = 37, 48  # odd token count, K not a power of two
    h = _rand(T, K, dtype=dtype, device="cpu")
    norm_weight = (1 + 0.1 * torch.randn(K)).to(dtype)
    _same(lora_linear_group, h, norm_weight, _group_params(K, (32, 16, 16), 4, dtype, "cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_keeps_the_residual_sum_not_its_norm(dtype):
    T, H, I = 29, 32, 48
    h = _rand(T, H, dtype=dtype, device="cpu")
    residual = _rand(T, H, dtype=dtype, device="cpu")
    norm_weight = (1 + 0.1 * torch.randn(H)).to(dtype)
    _same(lora_mlp, h, norm_weight, _mlp_params(H, I, 4, dtype, "cpu"), residual=residual)


def test_mlp_of_a_plain_norm_with_a_trained_norm_weight():
    T, H, I = 21, 32, 48
    h = _rand(T, H, dtype=torch.float32, device="cpu")
    norm_weight = (1 + 0.1 * torch.randn(H)).requires_grad_()  # its gradient flows through the norm, unchanged
    _same(lora_mlp, h, norm_weight, _mlp_params(H, I, 8, torch.float32, "cpu"))


def test_normed_from_must_match_the_input():
    x = torch.randn(8, 32)
    params = _group_params(32, (16,), 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="normed_from"):
        lora_linear_group(x, **params, normed_from=NormedInput(torch.randn(8, 16), torch.ones(16), EPS))


def test_a_rebuilt_input_left_by_an_earlier_backward_is_taken_once(monkeypatch):
    """values(keep=True) (the engine's k/v recompute) leaves y in the shared dict; the group's backward takes it
    (no second rebuild launch) and the gradients are those of a rebuild of its own."""
    from lorafuse.kernels._launch import launches

    T, H = 13, 32
    h = _rand(T, H, dtype=torch.float32, device="cpu")
    norm_weight = 1 + 0.1 * torch.randn(H)
    params = _group_params(H, (16, 8, 8), 4, torch.float32, "cpu")
    grads = []
    for leave in (False, True):
        normed = NormedInput(h, norm_weight, EPS, 0.0, {})
        outs = lora_linear_group(rms_norm(h, norm_weight, EPS), **params, normed_from=normed)
        if leave:
            y = normed.values(keep=True)
            assert normed.values(keep=True) is y and normed.rebuilt["y"] is y  # kept: built once
        before = launches["rms_norm_values"]
        leaves = [t for t in (*params["lora_as"], *params["lora_bs"])]
        grads.append(torch.autograd.grad(sum(o.sum() for o in outs), leaves))
        assert launches["rms_norm_values"] - before == (0 if leave else 1)
        assert normed.rebuilt == {}  # taken, not held on
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_group_and_mlp_bf16_on_gpu():
    h = _rand(1000, 512, dtype=torch.bfloat16, device="cuda")
    w = (1 + 0.1 * torch.randn(512, device="cuda")).to(torch.bfloat16)
    _same(lora_linear_group, h, w, _group_params(512, (512, 128, 128), 16, torch.bfloat16, "cuda"))
    _same(lora_mlp, h, w, _mlp_params(512, 1024, 16, torch.bfloat16, "cuda"), residual=torch.randn_like(h),
          exact=False)

"""Rotary embedding with per-document positions, q and k in one kernel, forward and backward.

Checked against transformers' own LlamaRotaryEmbedding + apply_rotary_pos_emb (Llama-3 scaled
inv_freq, and YaRN for attention_scaling != 1) and against a float64 reference, through the
Triton interpreter on CPU (float32, float16), with q and k as strided views of a fused qkv
projection output and every output buffer starting as NaN. The GPU test checks bfloat16 at
Llama-3-8B shapes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lorafuse.kernels import apply_rope
from lorafuse.kernels._launch import launches
from lorafuse.kernels.rope import apply_rope_reference

from kernel_utils import assert_close, expect_triton, poison_outputs, rel_err

# transformers 5.x names the rope settings `rope_parameters` (rope_theta inside); the 4.x
# `rope_scaling` + `rope_theta` keywords are still accepted and folded into it.
ROPE_PARAMETERS = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 8192},
}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_outputs(monkeypatch)


def rotary_config(kind: str, head_dim: int) -> LlamaConfig:
    params = ROPE_PARAMETERS[kind]
    # YaRN reads its factor from max_position_embeddings / original_max_position_embeddings too
    max_positions = 131072
    if kind == "yarn":
        max_positions = int(params["factor"]) * params["original_max_position_embeddings"]
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=head_dim, max_position_embeddings=max_positions, rope_parameters=dict(params))


def hf_inv_freq(kind: str, head_dim: int, device="cpu"):
    """HF's inv_freq (carrying the rope scaling) and attention_scaling, from ROPE_INIT_FUNCTIONS."""
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[kind](rotary_config(kind, head_dim), device)
    return inv_freq, attention_scaling


def document_positions(lengths, device="cpu"):
    """position_ids restarting at 0 in every packed document."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])


def fused_qkv_views(tokens, q_heads, kv_heads, head_dim, dtype, device="cpu"):
    """q [T, Hq, D] and k [T, Hkv, D] as the engine gets them: views of one qkv output (token stride
    (Hq + 2 Hkv) D), here with extra padding so no stride is a multiple of anything."""
    width = (q_heads + 2 * kv_heads) * head_dim + 3
    qkv = torch.randn(tokens, width, dtype=dtype, device=device)
    q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return q.requires_grad_(), k.requires_grad_()


def rope64(x, position_ids, inv_freq, attention_scaling):
    """Float64 rotate-half RoPE at the float32 angle float32(p) * inv_freq (HF's definition)."""
    angle = (position_ids[:, None].float() * inv_freq[None, :].float()).double()
    angle = torch.cat((angle, angle), dim=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * angle.cos() + rotated * angle.sin()) * attention_scaling


def leaf(t):
    return t.detach().clone().requires_grad_()


def run_ours(q, k, position_ids, inv_freq, scaling):
    with expect_triton("apply_rope"):
        q_out, k_out = apply_rope(q, k, position_ids, inv_freq, scaling)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == q.dtype
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    return q_out, k_out, dq_out, dk_out


def float64_rope(q, k, position_ids, inv_freq, scaling, dq_out, dk_out):
    q64, k64 = leaf(q.double()), leaf(k.double())
    q_ref, k_ref = rope64(q64, position_ids, inv_freq, scaling), rope64(k64, position_ids, inv_freq, scaling)
    torch.autograd.backward((q_ref, k_ref), (dq_out.double(), dk_out.double()))
    return q_ref, k_ref, q64.grad, k64.grad


def hf_rope(q, k, position_ids, kind, head_dim, dq_out, dk_out):
    """transformers' own path: LlamaRotaryEmbedding's cos/sin tables, then apply_rotary_pos_emb."""
    rotary = LlamaRotaryEmbedding(rotary_config(kind, head_dim)).to(q.device)
    cos, sin = rotary(q, position_ids[None])  # [1, T, D] in q's dtype, attention_scaling applied
    qh, kh = leaf(q), leaf(k)
    q_hf, k_hf = apply_rotary_pos_emb(qh, kh, cos[0], sin[0], unsqueeze_dim=1)
    torch.autograd.backward((q_hf, k_hf), (dq_out, dk_out))
    return q_hf, k_hf, qh.grad, kh.grad


def check(name, out, ref64, stock, dtype):
    """Within the dtype's tolerance of float64, and (low precision) no further than HF's own computation."""
    assert_close(out, ref64, dtype, name)
    if dtype != torch.float32:
        ours, theirs = rel_err(out, ref64), rel_err(stock, ref64)
        assert ours <= 1.1 * theirs + 1e-5, f"{name}: {ours:.3e} vs HF {dtype} {theirs:.3e}"


CASES = [  # (kind, head_dim, q_heads, kv_heads, document lengths)
    ("llama3", 128, 7, 1, [5, 1, 23, 8]),  # Llama-3 scaled inv_freq, several documents, one of length 1
    ("yarn", 64, 4, 4, [13]),              # attention_scaling != 1 (YaRN), one document
    ("llama3", 80, 1, 7, [1]),             # T = 1, head dim 80 (masked to 64 lanes per half)
    ("llama3", 128, 32, 8, [3, 6]),        # Llama-3-8B heads
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind,head_dim,q_heads,kv_heads,lengths", CASES,
                         ids=[f"{c[0]}-d{c[1]}-h{c[2]}x{c[3]}-docs{len(c[4])}" for c in CASES])
def test_rope_matches_hf_and_float64(kind, head_dim, q_heads, kv_heads, lengths, dtype):
    position_ids = document_positions(lengths)
    inv_freq, scaling = hf_inv_freq(kind, head_dim)
    assert (scaling != 1.0) == (kind == "yarn")
    q, k = fused_qkv_views(len(position_ids), q_heads, kv_heads, head_dim, dtype)

    q_out, k_out, dq_out, dk_out = run_ours(q, k, position_ids, inv_freq, scaling)
    q_ref, k_ref, dq_ref, dk_ref = float64_rope(q, k, position_ids, inv_freq, scaling, dq_out, dk_out)
    q_hf, k_hf, dq_hf, dk_hf = hf_rope(q, k, position_ids, kind, head_dim, dq_out, dk_out)

    if dtype == torch.float32:  # HF's float32 path is the same math: agree with it directly too
        for name, ours, theirs in (("q vs hf", q_out, q_hf), ("k vs hf", k_out, k_hf),
                                   ("dq vs hf", q.grad, dq_hf), ("dk vs hf", k.grad, dk_hf)):
            assert_close(ours, theirs, dtype, name, tol=1e-6)
    check("q", q_out, q_ref, q_hf, dtype)
    check("k", k_out, k_ref, k_hf, dtype)
    check("dq", q.grad, dq_ref, dq_hf, dtype)
    check("dk", k.grad, dk_ref, dk_hf, dtype)


def test_rope_long_positions():
    """Positions up to 131071 (Llama-3.1's context): angles of 1e5 rad, where a fast sin/cos fails."""
    inv_freq, scaling = hf_inv_freq("llama3", 128)
    position_ids = torch.cat([torch.tensor([0, 1, 131071]), torch.randint(0, 131072, (6,))])
    q, k = fused_qkv_views(len(position_ids), 3, 2, 128, torch.float32)
    q_out, k_out, dq_out, dk_out = run_ours(q, k, position_ids, inv_freq, scaling)
    q_ref, k_ref, dq_ref, dk_ref = float64_rope(q, k, position_ids, inv_freq, scaling, dq_out, dk_out)
    for name, ours, ref in (("q", q_out, q_ref), ("k", k_out, k_ref), ("dq", q.grad, dq_ref),
                            ("dk", k.grad, dk_ref)):
        assert_close(ours, ref, torch.float32, name)


def test_rope_contiguous_inputs_batch_position_ids_and_q_only_grad():
    """Contiguous q/k, position_ids shaped [1, T] (HF style), explicit attention_scaling, k frozen."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 96, 2).float() / 96))
    position_ids = document_positions([4, 7])
    q = torch.randn(11, 5, 96, requires_grad=True)
    k = torch.randn(11, 2, 96)
    with expect_triton("apply_rope"):
        q_out, k_out = apply_rope(q, k, position_ids[None], inv_freq, attention_scaling=0.75)
    dq_out = torch.randn_like(q_out)
    q_out.backward(dq_out)
    dk_out = torch.zeros_like(k_out)
    q_ref, k_ref, dq_ref, _ = float64_rope(q, k, position_ids, inv_freq, 0.75, dq_out, dk_out)
    assert_close(q_out, q_ref, torch.float32, "q")
    assert_close(k_out, k_ref, torch.float32, "k")
    assert_close(q.grad, dq_ref, torch.float32, "dq")


def test_rope_reference_mode_runs_no_kernel(monkeypatch):
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    q, k, position_ids = torch.randn(5, 2, 16), torch.randn(5, 1, 16), torch.arange(5)
    before = launches["apply_rope"]
    q_out, k_out = apply_rope(q, k, position_ids, inv_freq)
    assert launches["apply_rope"] == before
    q_ref, k_ref = apply_rope_reference(q, k, position_ids, inv_freq)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


def test_rope_rejects_bad_arguments():
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    inv_freq = torch.ones(8)
    with pytest.raises(ValueError):
        apply_rope(q, k, torch.arange(4), inv_freq)
    with pytest.raises(ValueError):
        apply_rope(q, k, torch.arange(5), torch.ones(4))  # partial rotary
    with pytest.raises(ValueError):
        apply_rope(q, torch.randn(5, 1, 8), torch.arange(5), inv_freq)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[4096] * 4, "mixed"], ids=["4x4096", "mixed-docs"])
def test_rope_bf16_gpu_llama3_8b(lengths):
    dtype, device = torch.bfloat16, "cuda"
    if lengths == "mixed":  # lognormal document lengths, median ~400, capped at 4096
        lengths = torch.distributions.LogNormal(6.0, 1.0).sample((40,)).clamp(1, 4096).long().tolist()
    position_ids = document_positions(lengths, device)
    inv_freq, scaling = hf_inv_freq("llama3", 128, device)
    q, k = fused_qkv_views(len(position_ids), 32, 8, 128, dtype, device)
    q_out, k_out, dq_out, dk_out = run_ours(q, k, position_ids, inv_freq, scaling)
    q_ref, k_ref, dq_ref, dk_ref = float64_rope(q, k, position_ids, inv_freq, scaling, dq_out, dk_out)
    q_hf, k_hf, dq_hf, dk_hf = hf_rope(q, k, position_ids, "llama3", 128, dq_out, dk_out)
    check("q", q_out, q_ref, q_hf, dtype)
    check("k", k_out, k_ref, k_hf, dtype)
    check("dq", q.grad, dq_ref, dq_hf, dtype)
    check("dk", k.grad, dk_ref, dk_hf, dtype)

    # Long context: positions up to 131071 keep float32 accuracy (precise sin/cos on the GPU).
    position_ids = torch.randint(0, 131072, (4096,), device=device)
    q, k = fused_qkv_views(4096, 32, 8, 128, torch.float32, device)
    q_out, k_out, dq_out, dk_out = run_ours(q, k, position_ids, inv_freq, scaling)
    q_ref, k_ref, _, _ = float64_rope(q, k, position_ids, inv_freq, scaling, dq_out, dk_out)
    assert_close(q_out, q_ref, torch.float32, "q long")
    assert_close(k_out, k_ref, torch.float32, "k long")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_copies_v_out_of_the_fused_buffer(dtype):
    """v given: the same launch returns v unrotated in a buffer of its own (the fused q/k/v buffer it was a view
    of can then be freed), q and k exactly as without v, and v's gradient passed through unchanged."""
    tokens, q_heads, kv_heads, head_dim = 13, 3, 2, 24  # head dim 24: masked to 16-wide halves
    width = (q_heads + 2 * kv_heads) * head_dim + 3
    qkv = torch.randn(tokens, width, dtype=dtype)
    views = [qkv[:, a * head_dim:(a + n) * head_dim].view(tokens, n, head_dim)
             for a, n in ((0, q_heads), (q_heads, kv_heads), (q_heads + kv_heads, kv_heads))]
    q, k, v = (leaf(t) for t in views)
    positions = document_positions([6, 1, 6])
    inv_freq, scaling = hf_inv_freq("llama3", head_dim)
    with expect_triton("apply_rope"):
        q_out, k_out, v_out = apply_rope(q, k, positions, inv_freq, scaling, v=v)
        q_alone, k_alone = apply_rope(q, k, positions, inv_freq, scaling)
    assert torch.equal(q_out, q_alone) and torch.equal(k_out, k_alone)
    assert torch.equal(v_out, v) and v_out.is_contiguous() and v_out.untyped_storage().data_ptr() != \
        qkv.untyped_storage().data_ptr()
    dv = torch.randn_like(v_out)
    torch.autograd.backward((q_out, k_out, v_out), (torch.randn_like(q_out), torch.randn_like(k_out), dv))
    assert torch.equal(v.grad, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_backward_with_v_writes_the_three_gradients_into_one_buffer(dtype):
    """With v, the backward's dq, dk (rotated back) and dv (copied) are views of one [T, Hq + 2 Hkv, D] buffer, in
    the fused projection's layout, so its backward reads them as one matrix; their values are those of the
    backward without v."""
    tokens, q_heads, kv_heads, head_dim = 11, 3, 2, 24
    q, k, v = (leaf(torch.randn(tokens, h, head_dim, dtype=dtype)) for h in (q_heads, kv_heads, kv_heads))
    positions = document_positions([4, 7])
    inv_freq, scaling = hf_inv_freq("llama3", head_dim)
    douts = [torch.randn(tokens, h, head_dim, dtype=dtype) for h in (q_heads, kv_heads, kv_heads)]
    with expect_triton("apply_rope"):
        dq, dk, dv = torch.autograd.grad(apply_rope(q, k, positions, inv_freq, scaling, v=v), (q, k, v), douts)
        dq_alone, dk_alone = torch.autograd.grad(apply_rope(q, k, positions, inv_freq, scaling), (q, k), douts[:2])
    assert torch.equal(dq, dq_alone) and torch.equal(dk, dk_alone) and torch.equal(dv, douts[2])
    storage = dq.untyped_storage().data_ptr()
    assert dk.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr() == storage
    width = (q_heads + 2 * kv_heads) * head_dim
    assert dq.stride(0) == dk.stride(0) == dv.stride(0) == width
    assert dk.data_ptr() == dq.data_ptr() + q_heads * head_dim * dq.element_size()
    assert dv.data_ptr() == dk.data_ptr() + kv_heads * head_dim * dk.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_values_rotates_one_tensor_like_apply_rope(dtype):
    """rope_values (the keys computed again in attention's backward): what apply_rope gives k, with one launch."""
    from lorafuse.kernels.rope import rope_values

    k = torch.randn(9, 2, 24, dtype=dtype)
    positions = document_positions([3, 6])
    inv_freq, scaling = hf_inv_freq("yarn", 24)
    before = launches["apply_rope"]
    _, k_rotated = apply_rope(torch.randn(9, 1, 24, dtype=dtype), k, positions, inv_freq, scaling)
    assert launches["apply_rope"] == before + 1
    with expect_triton("rope_values", at_least=2):
        assert torch.equal(rope_values(k, positions, inv_freq, scaling), k_rotated)
        assert torch.equal(rope_values(k, positions[None], inv_freq, scaling), k_rotated)  # [1, T] positions
